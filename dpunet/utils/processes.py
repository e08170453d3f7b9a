"""Worker processes that do not outlive their parent.

A pool worker waits for work on a pipe whose write end it holds itself (multiprocessing hands every worker the
whole queue), so a parent killed with SIGKILL leaves its workers waiting forever. `exit_with_parent`, run as a
pool's initializer, ends the worker when the parent dies: at once on Linux (prctl PR_SET_PDEATHSIG), and
elsewhere (or if prctl is unavailable) within `PARENT_POLL_SECONDS` by a thread that watches the parent's id.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal() -> None:
    """Ask Linux to send SIGKILL to this process when the thread that started it ends (best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watcher thread below still covers it


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # no cleanup: the parent that would collect our results is gone


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when process `parent_pid` (pass os.getpid() of the parent) dies."""
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="exit-with-parent").start()
