"""Keeping third-party debug output off the user's terminal."""
from __future__ import annotations

import os

# Kineto (torch.profiler's backend) prints "USDT: ... profiler_start / profiler_stop" on stderr at every profiled
# region; its levels run VERBOSE 0 .. USDT 5, so a minimum level of 6 keeps only what it raises as errors.
KINETO_QUIET_LEVEL = "6"


def quiet_profiler_logs() -> None:
    """Silence Kineto's per-region log lines. Kineto reads KINETO_LOG_LEVEL once, when the first profiler of the
    process starts: call this before it. A level the user set is kept."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET_LEVEL)
