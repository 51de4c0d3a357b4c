"""Scheduling niceness for the processes stalwart runs inside Ray workers.

Ray starts its worker processes at niceness 15, below every ordinary process on the node. That
suits short tasks that should yield to the node's daemons. It does not suit a training rank,
which is the node's main work, a spare that must be ready for the next fault, or the controller,
which must see a fault within a second. On Linux niceness belongs to each thread, and new threads
and processes inherit it from the thread that creates them.
"""

from __future__ import annotations

import os


def set_niceness(target: int | None, *, all_threads: bool = False) -> str | None:
    """Give the calling thread (or every thread of this process) niceness `target`.

    Returns why not if the OS refused: lowering niceness needs root, CAP_SYS_NICE or an
    RLIMIT_NICE that allows it, while raising it is always allowed. None does nothing.
    """
    if target is None or not hasattr(os, "setpriority"):
        return None
    tids = [0]
    if all_threads:
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            pass
    refused = None
    for tid in tids:
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
    if refused is None:
        return None
    return (f"running at niceness {refused}, not {target}: lowering it needs root or CAP_SYS_NICE (or an "
            f"RLIMIT_NICE that allows it)")
