"""Prometheus metrics (README "Audit log and metrics", "Monitoring").

With PROMETHEUS_MULTIPROC_DIR set (the `runkite` supervisor sets it), every
web and worker process writes its samples there and /metrics aggregates them.
"""

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the view)

EVENTS_INGESTED = Counter(
    "kite_events_ingested_total",
    "Webhooks received, by source name and outcome (accepted, duplicate or the error code).",
    ["source", "outcome"],
)
INGEST_SECONDS = Histogram(
    "kite_ingest_seconds",
    "Time to verify, convert and store one webhook.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


# Collectors read at scrape time (e.g. a gauge counted from the database), added by other apps
# in their AppConfig.ready(): kite knows nothing of them.
SCRAPE_COLLECTORS: list = []


class _ThisProcess:
    """The default registry: without a multiprocess directory one process serves every metric."""

    def collect(self):
        return REGISTRY.collect()


def render() -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    for collector in SCRAPE_COLLECTORS:
        registry.register(collector)
    return generate_latest(registry)
