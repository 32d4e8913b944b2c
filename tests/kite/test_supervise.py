"""runkite's supervisor: a child that exits is started again with backoff and says so; only SIGTERM or
Ctrl-C stops everything, with exit status 0. Children here are small Python processes standing in for
web, worker and beat."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest

from kite.management.commands import runkite
from kite.management.commands.runkite import Supervisor, describe_exit, restart_delay
from tests.e2e.harness import REPO, group_is_gone, wait_for


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restart_delays_double_from_one_second_up_to_thirty():
    assert [restart_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_exit_statuses_are_told_apart_from_signals():
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def _wait_for_exit(child) -> None:
    child.process.wait(timeout=10)


def test_a_crashing_child_is_restarted_with_backoff_and_logged_and_the_others_keep_running(capsys):
    clock = Clock()
    supervisor = Supervisor(
        {"worker": python("raise SystemExit(3)"), "beat": python("import time; time.sleep(60)")}, dict(os.environ),
        clock=clock,
    )  # fmt: skip
    worker, beat = supervisor.children
    supervisor.start()
    beat_process = beat.process
    try:
        delays = []
        for _ in range(7):
            _wait_for_exit(worker)
            supervisor.tick()  # notices the exit
            assert worker.process is None
            delays.append(worker.restart_at - clock.now)
            clock.now += delays[-1] - 0.01
            supervisor.tick()
            assert worker.process is None  # not before its delay
            clock.now += 0.01
            supervisor.tick()
            assert worker.process is not None  # started again
        assert delays == pytest.approx([1, 2, 4, 8, 16, 30, 30])
        assert beat.process is beat_process and beat_process.poll() is None  # never touched

        clock.now += 60  # this run stayed up a minute: healthy again, back to the first delay
        _wait_for_exit(worker)
        supervisor.tick()
        assert worker.restart_at - clock.now == pytest.approx(1)
    finally:
        supervisor.stop()
    err = capsys.readouterr().err
    assert "kite: worker exited with status 3; restarting it in 1 s" in err
    assert "kite: worker exited with status 3; restarting it in 30 s" in err
    assert err.count("kite: worker started again (pid ") == 7
    assert "beat" not in err
    assert beat_process.poll() is not None and worker.process is None


def test_a_killed_child_is_restarted_and_its_signal_named(capsys):
    clock = Clock()
    supervisor = Supervisor({"web": python("import time; time.sleep(60)")}, dict(os.environ), clock=clock)
    supervisor.start()
    (web,) = supervisor.children
    first = web.process
    try:
        first.kill()
        first.wait(timeout=10)
        supervisor.tick()
        clock.now += 1
        supervisor.tick()
        assert web.process is not None and web.process.pid != first.pid and web.process.poll() is None
    finally:
        supervisor.stop()
    assert "kite: web was killed by SIGKILL; restarting it in 1 s" in capsys.readouterr().err
    assert web.process.poll() is not None  # stop() ended the restarted one too


DRIVER = textwrap.dedent(
    """
    import sys
    from kite.management.commands.runkite import supervise

    crasher = [sys.executable, "-c", "import time; time.sleep(0.2); raise SystemExit(3)"]
    steady = [sys.executable, "-c", "import time; time.sleep(600)"]
    sys.exit(supervise({"worker": crasher, "web": steady}, None, first=0.3, cap=0.6, stable=60))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_only_a_stop_signal_stops_everything_and_runkite_then_exits_0(signum):
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum("worker started again" in line for line in lines) >= 2, 30, lambda: f"restarts: {lines}")
        assert process.poll() is None  # a crashing child stops nothing
        os.kill(process.pid, signum)  # the supervisor only, not its group: it must stop the children itself
        assert process.wait(timeout=12) == 0
        wait_for(lambda: group_is_gone(process.pid), 5, "every child to exit")
    finally:
        if not group_is_gone(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=5)
    err = "".join(lines)
    assert "kite: worker exited with status 3; restarting it in 0.3 s" in err
    assert "kite: worker exited with status 3; restarting it in 0.6 s" in err
    assert "web" not in err and "did not stop" not in err


STUCK_WORKER = textwrap.dedent("""
    import faulthandler, os, signal, subprocess, sys, time
    faulthandler.register(signal.SIGUSR1 if len(sys.argv) == 1 else signal.SIGWINCH, all_threads=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a warm shutdown that never ends
    if len(sys.argv) == 1:
        pool = subprocess.Popen([sys.executable, __file__, "pool"])
    def held_in_the_parent(): time.sleep(60)
    def held_in_the_pool(): time.sleep(60)
    print("ready", flush=True)
    held_in_the_pool() if len(sys.argv) > 1 else held_in_the_parent()
""")


def test_a_child_that_does_not_stop_in_its_grace_says_where_it_is_stuck_before_it_is_killed(tmp_path, monkeypatch, capfd):
    """A worker whose shutdown hangs: before runkite kills it, it and its pool processes print every
    thread's stack (SIGUSR1: Celery's handler in the worker; SIGWINCH: faulthandler in the pool: kite.celery)."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_WORKER)
    monkeypatch.setattr(runkite, "STOP_GRACE_SECONDS", 1)
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert [worker.stdout.readline(), worker.stdout.readline()] == ["ready\n"] * 2  # both have their handler
    pool = runkite.children_of(worker.pid)
    assert len(pool) == 1

    runkite.stop_all({"worker": worker})

    assert worker.returncode == -signal.SIGKILL
    err = capfd.readouterr().err
    assert "kite: worker did not stop in 1 s; killing it" in err
    # The two processes write to the same stderr at once, so their lines interleave: each function
    # name is written in one piece, the " in " before it in another.
    assert "held_in_the_parent" in err and "held_in_the_pool" in err, err
    for pid in pool:
        os.kill(pid, signal.SIGKILL)


def test_a_real_worker_and_its_pool_processes_print_their_stacks_and_keep_running(tmp_path):
    """What runkite sends a worker it is about to kill: the worker (Celery's SIGUSR1 handler) and its
    pool process (faulthandler on SIGWINCH: SIGUSR1 there is billiard's soft time limit, which would
    end the process with a traceback) print every thread's stack, and nothing else happens."""
    env = _embedded_env(tmp_path)
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "kite", "worker", "--concurrency", "1",
                                   "--loglevel", "WARNING"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _pool_ready(worker.pid), 60, "the pool process and its handler")
        pool = runkite.children_of(worker.pid)
        runkite.dump_stacks(worker.pid, *runkite.DUMP_SIGNALS["worker"])
        wait_for(lambda: "most recent call first" in log.read_text(), 10, lambda: log.read_text()[-2000:])
        assert worker.poll() is None and runkite.children_of(worker.pid) == pool  # no process ended
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=20)
    text = log.read_text()
    assert "MainThread" in text  # Celery's dump of the worker process
    assert "Current thread" in text and "billiard/pool.py" in text  # faulthandler's, in the pool
    assert "Traceback" not in text and "SoftTimeLimitExceeded" not in text and "exited with" not in text, text


def test_a_real_beat_prints_its_stacks_and_keeps_running(tmp_path):
    """What runkite sends a beat it is about to kill (it did not stop in its grace time): faulthandler
    on SIGWINCH prints every thread's stack, and beat goes on until it is stopped."""
    env = _embedded_env(tmp_path)
    log = tmp_path / "beat.log"
    with log.open("w") as out:
        beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "kite", "beat", "--schedule",
                                 str(tmp_path / "schedule"), "--loglevel", "WARNING"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: _catches(beat.pid, signal.SIGWINCH), 60, lambda: f"beat's handler; log: {log.read_text()}")
        runkite.dump_stacks(beat.pid, *runkite.DUMP_SIGNALS["beat"])
        wait_for(lambda: "most recent call first" in log.read_text(), 10, lambda: log.read_text()[-2000:])
        time.sleep(1)  # beat goes on ticking after the dump
        assert beat.poll() is None
        text = log.read_text()  # up to the stop: a SIGTERM that lands mid-tick may log Celery's own traceback
    finally:
        beat.send_signal(signal.SIGTERM)
        beat.wait(timeout=20)
    assert "Current thread" in text and "celery/beat.py" in text, text
    assert "Traceback" not in text, text


def _embedded_env(tmp_path) -> dict:
    """The environment of a Kite on its embedded defaults (SQLite) in `tmp_path`, its database migrated."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR") and not key.startswith("KITE_")}
    env.update(KITE_DATA_DIR=str(tmp_path / "data"), DJANGO_SETTINGS_MODULE="kite.settings")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True, timeout=120)
    return env


def _catches(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(mask & 1 << (signum - 1))


def _pool_ready(pid: int) -> bool:
    """The worker's pool process is up and has its SIGWINCH handler."""
    children = runkite.children_of(pid)
    return bool(children) and all(_catches(child, signal.SIGWINCH) for child in children)


# --- liveness files: what the compose health checks read (kite/celery.py) -----------------------------


class _Timer:
    def __init__(self):
        self.entries = []

    def call_repeatedly(self, seconds, fun, args=()):
        entry = SimpleNamespace(seconds=seconds, run=lambda: fun(*args), cancelled=False)
        entry.cancel = lambda: setattr(entry, "cancelled", True)
        self.entries.append(entry)
        return entry


def _age(path) -> float:
    return time.time() - path.stat().st_mtime


def _make_stale(path) -> None:
    os.utime(path, (time.time() - 100, time.time() - 100))


def test_a_worker_touches_its_liveness_file_while_its_consumer_runs_only(tmp_path):
    from kite.celery import LIVENESS_SECONDS, WorkerLiveness

    alive, consumer = tmp_path / "worker.alive", SimpleNamespace(timer=_Timer())
    step = WorkerLiveness(consumer, liveness_file=str(alive))
    step.start(consumer)  # connected and consuming
    assert _age(alive) < 5
    (entry,) = consumer.timer.entries
    assert entry.seconds == LIVENESS_SECONDS == 10
    _make_stale(alive)
    entry.run()
    assert _age(alive) < 5
    step.stop(consumer)  # Celery stops the consumer's steps when the broker connection is lost
    assert entry.cancelled

    without, bare = WorkerLiveness(consumer, liveness_file=None), SimpleNamespace(timer=_Timer())
    without.start(bare)
    assert not bare.timer.entries  # no --liveness-file: nothing written


class _BeatService:  # the sender of beat_init (celery.beat.Service)
    def __init__(self, schedule_filename: str):
        self.schedule_filename = schedule_filename


def test_beat_touches_schedule_alive_when_the_broker_takes_a_message_and_other_processes_do_not(tmp_path):
    from celery.signals import after_task_publish, beat_init

    from kite import celery as kite_celery

    schedule = tmp_path / "celerybeat-schedule"
    after_task_publish.send(sender="federation.tasks.sweep_outbox")  # a web or worker process publishing
    assert not list(tmp_path.iterdir())
    beat_init.send(sender=_BeatService(str(schedule)))
    try:
        after_task_publish.send(sender="federation.tasks.sweep_outbox")
        alive = tmp_path / "celerybeat-schedule.alive"
        assert _age(alive) < 5
        _make_stale(alive)
        after_task_publish.send(sender="federation.tasks.sweep_outbox")
        assert _age(alive) < 5
    finally:
        kite_celery._beat_liveness.clear()


def test_beat_acts_on_its_first_stop_signal_only():
    """The group's SIGTERM and runkite's own both reach beat: Celery's handler run a second time,
    while the first stop held a threading.Event's lock, deadlocked beat until it was killed."""
    from kite import celery as kite_celery

    calls = []

    def celerys(signum, frame):
        calls.append(signum)
        raise SystemExit()

    before = {signum: signal.signal(signum, celerys) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        kite_celery._beat_stops_once()
        with pytest.raises(SystemExit):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # beat is stopping already: nothing
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert calls == [signal.SIGTERM]
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
