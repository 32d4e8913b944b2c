from prometheus_client import Counter, Histogram

CALLS = Counter(
    "kite_federation_calls_total", "Peer-to-peer calls by peer, direction and outcome.", ["peer", "direction", "outcome"]
)
DROPPED = Counter(
    "kite_federation_dropped_total", "Events not forwarded to a peer, by reason.", ["peer", "reason"]
)
DELIVERY_SECONDS = Histogram(
    "kite_federation_delivery_seconds",
    "Seconds from an event's arrival to its delivery to a peer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
