#!/usr/bin/env python3
"""Trust benchmark (issue 4): two real Kite instances A and B, PostgreSQL + Redis.

Reuses bench/federation.py's set-up (its own services on its own ports, two fresh
databases, `manage.py runkite` per instance with TLS, A → B federated by hand).

1. invitation → active: A `POST /api/federation/invitations`, B
   `POST /api/federation/invitations/accept`; seconds from the accept call to both
   peer rows `active` (each side's API polled every 20 ms). Target ≤ 3 s.
2. cost of both factors: unbatched delivery throughput A → B (one signed POST per
   event, where per-request costs show most) with A signing v1a + presenting its
   certificate and B verifying it against the pin, against the same rounds with
   the v1 HMAC only; rounds alternate. Target: ≤ 5 % of throughput.

    .venv/bin/python bench/trust.py --wait-quiet 600
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fedbench", ROOT / "bench" / "federation.py")
fb = importlib.util.module_from_spec(spec)
sys.modules["fedbench"] = fb
spec.loader.exec_module(fb)
log, med = fb.log, fb.med


def active(kite, peer_id) -> bool:
    return kite.api("GET", f"/api/federation/peers/{peer_id}").json().get("status") == "active"


def invitation_round(bench, n: int) -> float:
    created = bench.a.api("POST", "/api/federation/invitations", json={"name": f"inv-b-{n}", "scopes": []})
    assert created.status_code == 201, created.text
    started = time.monotonic()
    accepted = bench.b.api("POST", "/api/federation/invitations/accept",
                           json={"invitation": created.json()["invitation"], "name": f"inv-a-{n}"})  # fmt: skip
    assert accepted.status_code == 201, accepted.text
    a_side, b_side = created.json()["peer_id"], accepted.json()["id"]
    while not (active(bench.a, a_side) and active(bench.b, b_side)):
        if time.monotonic() - started > 60:
            raise SystemExit(f"invitation round {n}: not active on both sides after 60 s")
        time.sleep(0.02)
    return time.monotonic() - started


def set_factors(bench, both: bool) -> None:
    """Both factors: A has a certificate, B's row for A pins it. Else: neither."""
    bench.a.sql("DELETE FROM federation_identitycertificate")
    bench.b.sql("UPDATE federation_peer SET certificate_pem = '', certificate_thumbprint = '' WHERE role = 'sender'")
    if both:
        cert = bench.a.api("POST", "/api/federation/certificates", json={"subject": "bench a"}).json()
        bench.b.sql("UPDATE federation_peer SET certificate_pem = %s, certificate_thumbprint = %s WHERE role = 'sender'",
                    (cert["pem"], cert["thumbprint"]))  # fmt: skip
    time.sleep(1.2)  # A's worker re-reads its peer (and so its signer) at most once a second


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invitations", type=int, default=7, help="invitation rounds")
    parser.add_argument("--events", type=int, default=1500, help="events per throughput round")
    parser.add_argument("--rounds", type=int, default=4, help="throughput rounds per variant")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS")
    own = parser.parse_args(argv)
    args = fb.build_parser().parse_args(["--no-write"])
    if own.wait_quiet:
        fb.wait_until_quiet(own.wait_quiet, args.quiet_load)
    bench = fb.Bench(args)
    try:
        bench.start()
        seconds = [invitation_round(bench, n) for n in range(own.invitations)]
        log("invitation → active on both sides, s: " + ", ".join(f"{s:.2f}" for s in seconds)
            + f"; median {med(seconds):.2f}, max {max(seconds):.2f}")  # fmt: skip
        rates = {"v1 only": [], "v1 + v1a": []}
        for r in range(own.rounds):
            for variant in ("v1 only", "v1 + v1a") if r % 2 == 0 else ("v1 + v1a", "v1 only"):
                set_factors(bench, variant == "v1 + v1a")
                result = fb.throughput_round(bench, False, own.events, f"trust{r}{len(rates[variant])}{variant[-1]}")
                rates[variant].append(result["steady_rate"] if "steady_rate" in result else result["rate"])
                log(f"round {r + 1} {variant}: {rates[variant][-1]:.0f} events/s")
        base, both = med(rates["v1 only"]), med(rates["v1 + v1a"])
        log(f"unbatched delivery: v1 only {base:.0f}/s, v1 + v1a {both:.0f}/s (medians of {own.rounds}); "
            f"cost {100 * (base - both) / base:+.1f} % (target ≤ 5 %)")  # fmt: skip
        log("problems: " + ("; ".join(bench.problems) or "none"))
    finally:
        bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
