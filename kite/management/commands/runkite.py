"""Run web (uvicorn), a Celery worker and Celery beat in the foreground.

`make run` ends here. Ctrl-C (or SIGTERM) stops all three; if one of them
dies the others are stopped too and the exit status says so.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from kite import tls

STOP_GRACE_SECONDS = 10


class Command(BaseCommand):
    help = "Migrate, bootstrap, then serve web + worker + beat until interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--no-setup", action="store_true", help="skip migrate and bootstrap")
        parser.add_argument("--no-worker", action="store_true", help="web only (run workers elsewhere)")
        parser.add_argument("--no-beat", action="store_true", help="no Celery beat (run exactly one elsewhere)")
        parser.add_argument("--worker-concurrency", type=int, default=2)

    def handle(self, *args, **options):
        if not options["no_setup"]:
            call_command("migrate", interactive=False, verbosity=0)
            call_command("bootstrap", stdout=self.stdout)
        env = self._child_env()
        commands = {"web": self._web_command()}
        if not options["no_worker"]:
            commands["worker"] = self._celery("worker", "--concurrency", str(options["worker_concurrency"]))
        if not options["no_beat"]:
            commands["beat"] = self._celery("beat", "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME)
        self.stdout.write(self.style.SUCCESS(f"Kite {settings.KITE_INSTANCE_ID} on {settings.KITE_PUBLIC_URL}"))
        self.stdout.write(f"  data dir: {settings.KITE_DATA_DIR}   processes: {', '.join(commands)}")
        if settings.KITE_TLS:
            pem = (settings.KITE_DATA_DIR / "tls" / "cert.pem").read_bytes()
            self.stdout.write(f"  TLS certificate: {settings.KITE_DATA_DIR / 'tls' / 'cert.pem'}")
            self.stdout.write(f"  tls_fingerprint: {tls.fingerprint_of_pem(pem)}")
        self.stdout.flush()
        sys.exit(supervise(commands, env))

    def _child_env(self) -> dict:
        env = dict(os.environ)
        metrics_dir = Path(settings.KITE_DATA_DIR) / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)  # samples of dead processes from an earlier run
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")
        return env

    def _web_command(self) -> list[str]:
        command = [
            sys.executable, "-m", "uvicorn", "kite.asgi:application",
            "--host", settings.KITE_HOST, "--port", str(settings.KITE_PORT),
            "--workers", str(settings.KITE_WEB_WORKERS), "--lifespan", "on",
            "--no-access-log", "--timeout-graceful-shutdown", "5", *proxy_header_args(settings.KITE_TRUSTED_PROXIES),
        ]  # fmt: skip
        if settings.KITE_TLS:
            cert, key = tls.ensure_server_certificate(Path(settings.KITE_DATA_DIR) / "tls", [settings.KITE_HOST])
            command += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        return command

    def _celery(self, *args) -> list[str]:
        # Beat fires every second (the outbox sweeper): at INFO, Celery would log each run.
        level = "DEBUG" if settings.KITE_LOG_LEVEL == "DEBUG" else "WARNING"
        return [sys.executable, "-m", "celery", "-A", "kite", *args, "--loglevel", level]


def proxy_header_args(trusted: list[str]) -> list[str]:
    """uvicorn believes X-Forwarded-For/-Proto from 127.0.0.1 unless told otherwise: any local process
    could then pass for any address (a grant's source_cidrs) or scheme. Only KITE_TRUSTED_PROXIES may."""
    if not trusted:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", "--forwarded-allow-ips", ",".join(trusted)]


def supervise(commands: dict[str, list[str]], env: dict) -> int:
    children = {name: subprocess.Popen(argv, env=env) for name, argv in commands.items()}
    stopping = []

    def request_stop(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    status = 0
    while not stopping:
        dead = {name: child.returncode for name, child in children.items() if child.poll() is not None}
        if dead and not stopping:  # (not a child that got the same Ctrl-C a moment before us)
            for name, code in dead.items():
                print(f"kite: {name} exited with status {code}; stopping the others", file=sys.stderr)
            status = 1
            break
        time.sleep(0.2)
    _stop_all(children)
    return status


def _stop_all(children: dict[str, subprocess.Popen]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"kite: {name} did not stop in {STOP_GRACE_SECONDS} s; killing it", file=sys.stderr)
            child.kill()
            child.wait()
