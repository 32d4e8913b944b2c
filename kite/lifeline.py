"""Processes that die with the process that started them.

A uvicorn worker outlives a SIGKILLed uvicorn master: it keeps the listening socket, keeps
serving the old code, and every web that runkite (or systemd without a control group) starts
again fails with "address already in use". The same holds for runkite's own children when
runkite is killed. Linux's parent-death signal closes that hole: the kernel sends the child a
signal the moment its parent exits, however it exits. (Celery's prefork pool processes already
set it for themselves.)
"""

import os
import signal

from billiard.util import set_pdeathsig


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask for `signum` when the parent exits; if it already has, take it now."""
    parent = os.getppid()
    try:
        set_pdeathsig(signum)
    except OSError:  # not Linux: nothing to do, as before
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)
