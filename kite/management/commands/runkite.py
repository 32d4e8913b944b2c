"""Run web (uvicorn), a Celery worker and Celery beat in the foreground.

`make run` ends here. A child that exits is started again after 1 s, 2 s, 4 s … at most 30 s
(back to 1 s once it had stayed up a minute), with a line on stderr naming it, its exit status
and the delay; the others keep running. Only Ctrl-C (or SIGTERM) stops all three, exit status 0.
"""

import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from kite import crypto, instance_env, lifeline, pooling, tls

# A worker's warm shutdown waits for its running tasks, and a delivery in flight to a peer that
# accepted the connection but does not answer ends at its read timeout (federation.client, 10 s).
STOP_GRACE_SECONDS = 15
# Children that say where they are stuck before they are killed: (signal for the process, for its own
# children). The worker: Celery's SIGUSR1 handler; its pool processes and beat, faulthandler on SIGWINCH
# (kite.celery).
DUMP_SIGNALS = {"worker": (signal.SIGUSR1, signal.SIGWINCH), "beat": (signal.SIGWINCH, signal.SIGWINCH)}
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0  # up this long, a child is healthy again: its next exit restarts after the first delay


class Command(BaseCommand):
    help = "Migrate, bootstrap, then serve web + worker + beat until interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--no-setup", action="store_true", help="skip migrate and bootstrap")
        parser.add_argument("--no-worker", action="store_true", help="web only (run workers elsewhere)")
        parser.add_argument("--no-beat", action="store_true", help="no Celery beat (run exactly one elsewhere)")
        parser.add_argument("--worker-concurrency", type=int, default=2)

    def handle(self, *args, **options):
        problem = pooling.prepared_statements_problem()  # before migrate, which could meet it first
        if problem:
            raise CommandError(problem)
        if not options["no_setup"]:
            call_command("migrate", interactive=False, verbosity=0)
            call_command("bootstrap", stdout=self.stdout)
        crypto.check_stored_secrets()  # keys that cannot decrypt what is stored: one line, nothing started
        instance_env.record(Path(settings.KITE_DATA_DIR), os.environ)  # for `manage.py --data-dir` (kite.instance_env)
        check_listen_address(settings.KITE_HOST, settings.KITE_PORT)
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
        code = supervise(commands, env)
        # Every child has exited and runkite holds nothing that needs closing: skip the interpreter's
        # teardown of Django and the migrations it loaded (0.3-1 s of CPU at every stop).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

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
            cert, key = server_certificate(Path(settings.KITE_DATA_DIR) / "tls", settings.KITE_HOST)
            command += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        return command

    def _celery(self, *args) -> list[str]:
        # Beat fires every second (the outbox sweeper): at INFO, Celery would log each run.
        level = "DEBUG" if settings.KITE_LOG_LEVEL == "DEBUG" else "WARNING"
        return [sys.executable, "-m", "celery", "-A", "kite", *args, "--loglevel", level]


def check_listen_address(host: str, port: int) -> None:
    """uvicorn failing to bind would exit, be restarted and fail again, forever: say it once, start nothing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise CommandError(f"KITE_HOST/KITE_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def server_certificate(directory: Path, host: str) -> tuple[Path, Path]:
    """The certificate and key uvicorn will serve, generated if missing, loaded once here so that an
    unreadable or broken one is one line now, not a web process failing on every restart."""
    try:
        cert, key = tls.ensure_server_certificate(directory, [host])
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise CommandError(f"KITE_TLS=on: {directory}/cert.pem and key.pem are not a PEM certificate and its "
                           f"private key ({exc.reason or 'not loadable'}); fix them, or delete both to have Kite "
                           "generate new ones") from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise CommandError(f"KITE_TLS=on: cannot use the TLS certificate and key in {directory}: {exc}") from None
    return cert, key


def proxy_header_args(trusted: list[str]) -> list[str]:
    """uvicorn believes X-Forwarded-For/-Proto from 127.0.0.1 unless told otherwise: any local process
    could then pass for any address (a grant's source_cidrs) or scheme. Only KITE_TRUSTED_PROXIES may."""
    if not trusted:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", "--forwarded-allow-ips", ",".join(trusted)]


def restart_delay(exits_in_a_row: int, first: float = RESTART_FIRST_SECONDS, cap: float = RESTART_MAX_SECONDS) -> float:
    """1 s, 2 s, 4 s … cap: a child that keeps failing (the database is down) is not respawned in a busy loop."""
    return min(cap, first * 2 ** (exits_in_a_row - 1))


def describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    exits_in_a_row: int = 0  # exits each before STABLE_SECONDS of uptime
    restart_at: float = 0.0


class Supervisor:
    """Keeps every child running until stop(); tick() is one look at them (the loop is in supervise())."""

    def __init__(self, commands: dict[str, list[str]], env: dict, *, first=RESTART_FIRST_SECONDS,
                 cap=RESTART_MAX_SECONDS, stable=STABLE_SECONDS, clock=time.monotonic):  # fmt: skip
        self.children = [Child(name, argv) for name, argv in commands.items()]
        self.env, self.first, self.cap, self.stable, self.clock = env, first, cap, stable, clock

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def tick(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.process is None and now >= child.restart_at:
                self._spawn(child)
                _say(f"{child.name} started again (pid {child.process.pid})")
            elif child.process is not None and child.process.poll() is not None:
                self._schedule_restart(child, now)

    def _spawn(self, child: Child) -> None:
        # preexec: each child (and so each uvicorn master, Celery worker, beat) ends when runkite does,
        # even if runkite is SIGKILLed; runkite itself is single-threaded, where preexec_fn is safe.
        process = subprocess.Popen(child.argv, env=self.env, preexec_fn=lifeline.die_with_parent)
        child.process, child.started_at = process, self.clock()

    def _schedule_restart(self, child: Child, now: float) -> None:
        stayed_up = now - child.started_at >= self.stable
        child.exits_in_a_row = 1 if stayed_up else child.exits_in_a_row + 1
        delay = restart_delay(child.exits_in_a_row, self.first, self.cap)
        _say(f"{child.name} {describe_exit(child.process.returncode)}; restarting it in {delay:g} s")
        child.process, child.restart_at = None, now + delay

    def stop(self) -> None:
        stop_all({child.name: child.process for child in self.children if child.process is not None})


def _say(message: str) -> None:
    print(f"kite: {message}", file=sys.stderr, flush=True)


def supervise(commands: dict[str, list[str]], env: dict, **delays) -> int:
    supervisor = Supervisor(commands, env, **delays)
    stopping = []

    def request_stop(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    supervisor.start()
    while not stopping:
        supervisor.tick()
        time.sleep(0.2)
    supervisor.stop()
    return 0


def stop_all(children: dict[str, subprocess.Popen]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"kite: {name} did not stop in {STOP_GRACE_SECONDS} s; killing it", file=sys.stderr, flush=True)
            if name in DUMP_SIGNALS:
                dump_stacks(child.pid, *DUMP_SIGNALS[name])
            child.kill()
            child.wait()


def dump_stacks(pid: int, signum: int, children_signum: int) -> None:
    """Have a process and its own children print every thread's stack to the log, so a stop that
    had to kill says why."""
    for target, sent in ((pid, signum), *((child, children_signum) for child in children_of(pid))):
        try:
            os.kill(target, sent)
        except OSError:
            pass
    time.sleep(1.0)


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []  # not Linux, or gone: the dump is a diagnostic only
