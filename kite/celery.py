import faulthandler
import os
import signal
import sys
from pathlib import Path

import click
from celery import Celery, bootsteps
from celery.signals import (
    after_task_publish,
    beat_init,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from kite import celery_fixes  # noqa: F401 - workers survive a broker restart (see the module)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")

app = Celery("kite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

LIVENESS_SECONDS = 10  # a worker touches its --liveness-file this often while it consumes


@task_prerun.connect
@task_postrun.connect
def _database_connections(**kwargs):
    """What Django does around a request: drop a connection that is broken, past CONN_MAX_AGE or
    left in a transaction; keep the others (CELERY_DB_REUSE_MAX stops Celery closing them all)."""
    from django.db import close_old_connections

    close_old_connections()


@worker_init.connect
def _keys_decrypt_what_is_stored(**kwargs):
    """A worker whose KITE_ENCRYPTION_KEYS cannot decrypt the stored secrets would fail every delivery
    and ping: it stops at start with one line naming the variable and the key file (kite.crypto)."""
    import django

    django.setup()
    from kite import crypto

    try:
        crypto.check_stored_secrets()
    except crypto.UndecryptableSecret as exc:
        print(f"kite: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    from kite import pooling

    pooling.exit_if_prepared_statements_break("worker")  # behind a transaction-pooling PgBouncer


@worker_process_init.connect
def _tracing(**kwargs):
    """OTEL_EXPORTER_OTLP_ENDPOINT set: traces (kite.tracing), set up in each pool process, where
    tasks run: an exporter made before the fork would hand each child its locks and connections
    as they were at that moment. (Beat is not traced: it only publishes.)"""
    from kite import tracing

    tracing.setup()


@worker_process_shutdown.connect
def _tracing_flush(**kwargs):
    """A pool process ends without running atexit: what its exporter still holds is sent first."""
    from kite import tracing

    tracing.flush(timeout_millis=1000)  # a collector that is away holds up no shutdown


@worker_process_init.connect
@beat_init.connect
def _pool_process_dumps_stacks(**kwargs):
    """SIGWINCH prints every thread's stack to stderr, as SIGUSR1 (Celery's handler) does in the worker
    process: runkite sends them to a worker and its pool processes, and to beat, that did not stop in
    its grace time. Not SIGUSR1 (billiard's soft time limit in a pool process) nor SIGUSR2 (billiard's
    terminate handlers take it over): SIGWINCH is ignored by default, so a process that has not set
    its handler yet just goes on. sys.stderr is Celery's logging proxy, with no file descriptor."""
    faulthandler.register(signal.SIGWINCH, file=sys.__stderr__, all_threads=True)


@worker_process_init.connect
@worker_ready.connect
@beat_init.connect
def _freeze_loaded(**kwargs):
    """What the process loaded at start stays out of the garbage collector's full passes, which
    otherwise walk it with the GIL held (50–165 ms each; kite.heap): each pool process, the worker's
    own process (it takes the broker's messages and hands them to the pool) once it is ready, beat."""
    from kite import heap

    heap.freeze_loaded()


@beat_init.connect
def _beat_stops_once(**kwargs):
    """Only beat's first stop signal acts. A stop signalled to runkite's process group reaches beat
    twice (the group's SIGTERM, then runkite's own): Celery's handler (save the schedule, raise
    SystemExit) run again while the first stop was setting a threading.Event held that Event's
    lock, and beat deadlocked on it until runkite killed it. The handler is Celery's, installed
    before beat_init; a later signal finds beat already stopping."""
    stopping: list[int] = []

    def first_only(handler):
        def once(signum, frame):
            if stopping:
                return
            stopping.append(signum)
            handler(signum, frame)

        return once

    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if callable(handler):
            signal.signal(signum, first_only(handler))


@worker_process_init.connect
def _pool_process_ignores_sigterm(**kwargs):
    """A stop signalled to runkite's whole process group (a terminal's kill, systemd's default
    KillMode) also reached the prefork pool processes, which die of SIGTERM; one that died writing
    a result kept the pool's result-queue lock for good, and the worker's warm shutdown then hung
    until runkite SIGKILLed it. The worker process stops them itself once their task is done (the
    pool's sentinel; SIGKILL after a time limit) and they die with it (Celery sets pdeathsig)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --- liveness files for health checks (docker/compose.yaml) ------------------------------------
# A health check that asks the worker over the broker (`celery inspect ping`) starts Django and
# Celery and waits on a round trip: seconds of CPU per check, and it fails for every worker at once
# when the broker blinks. A file's age is read in a millisecond and says what matters: this process
# still turns its event loop and talks to the broker.


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass  # a health check reading a stale file says more than a worker dying of a full disk


class WorkerLiveness(bootsteps.StartStopStep):
    """Touches --liveness-file now and every LIVENESS_SECONDS while the consumer is connected: Celery
    stops the consumer's steps when the broker connection is lost and starts them once it is back."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer, liveness_file=None, **kwargs):
        self.path, self.timer_entry = Path(liveness_file) if liveness_file else None, None
        super().__init__(consumer, **kwargs)

    def start(self, consumer):
        if self.path:
            _touch(self.path)
            self.timer_entry = consumer.timer.call_repeatedly(LIVENESS_SECONDS, _touch, (self.path,))

    def stop(self, consumer):
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    shutdown = stop


app.user_options["worker"].add(
    click.Option(["--liveness-file"], help=f"touched every {LIVENESS_SECONDS} s while connected to the broker")
)
app.steps["consumer"].add(WorkerLiveness)

_beat_liveness: list[Path] = []  # set in the beat process only


@beat_init.connect
def _beat_started(sender, **kwargs):
    _beat_liveness[:] = [Path(f"{sender.schedule_filename}.alive")]


@after_task_publish.connect
def _beat_published(**kwargs):
    """Beat sends the outbox sweep every second: the file is as old as beat's last message the broker took."""
    if _beat_liveness:
        _touch(_beat_liveness[0])
