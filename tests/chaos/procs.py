"""A live instance's processes, read from /proc: who is who in runkite's process group."""

import os
from pathlib import Path


def argv_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def group_processes(pgid: int) -> dict[int, str]:
    """Every process of process group `pgid` (runkite's, in the tests): pid → command line."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(entry)) == pgid:
                found[int(entry)] = argv_of(int(entry))
        except OSError:  # gone meanwhile
            continue
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if parent_of(int(entry)) == pid:
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def runkite_children(runkite_pid: int) -> dict[str, int]:
    """runkite's direct children by role: web (the uvicorn master), worker, beat."""
    roles = {}
    for pid in children_of(runkite_pid):
        argv = argv_of(pid)
        if "uvicorn" in argv:
            roles["web"] = pid
        elif "celery" in argv:
            roles["beat" if " beat " in argv else "worker"] = pid
    return roles


def web_workers(master: int) -> list[int]:
    """The uvicorn master's worker processes (multiprocessing spawn; not its resource tracker)."""
    return [pid for pid in children_of(master) if "spawn_main" in argv_of(pid)]
