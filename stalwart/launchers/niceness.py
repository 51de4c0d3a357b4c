"""Scheduling niceness for the processes stalwart runs inside Ray workers.

Ray starts its worker processes at niceness 15, below every ordinary process on the node. That
suits short tasks that should yield to the node's daemons. It does not suit a training rank,
which is the node's main work, a spare that must be ready for the next fault, or the controller,
which must see a fault within a second. On Linux niceness belongs to each thread, and new threads
and processes inherit it from the thread that creates them.
"""

from __future__ import annotations

import os


def _threads() -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:  # not Linux: niceness is the process's
        return [0]


def set_niceness(target: int | None, *, all_threads: bool = False) -> str | None:
    """Give the calling thread (or every thread of this process) niceness `target`.

    Returns why not if the OS refused: lowering niceness needs root, CAP_SYS_NICE or an
    RLIMIT_NICE that allows it, while raising it is always allowed. None does nothing.
    """
    if target is None or not hasattr(os, "setpriority"):
        return None
    refused, done = None, set()
    for _ in range(3):  # again while threads appear: one started meanwhile took its creator's old value
        tids = _threads() if all_threads else [0]
        new = [tid for tid in tids if tid not in done]
        if not new:
            break
        for tid in new:
            done.add(tid)
            try:
                current = os.getpriority(os.PRIO_PROCESS, tid)
            except OSError:  # a thread that ended meanwhile
                continue
            if current == target:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, tid, target)
            except PermissionError:
                refused = current
            except OSError:
                continue
        if not all_threads:
            break
    if refused is None:
        return None
    return (f"running at niceness {refused}, not {target}: lowering it needs root or CAP_SYS_NICE (or an "
            f"RLIMIT_NICE that allows it)")
