"""What a user sees on the terminal: no third-party debug lines (Kineto's USDT profiler lines in the CPU
benchmark), and the accountants' warnings summarised once per run instead of repeated at every call."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from dpunet.privacy import accounting

REPO = Path(__file__).resolve().parents[1]
PROFILE = ("import torch\nfrom torch.profiler import ProfilerActivity, profile\n{before}"
           "with profile(activities=[ProfilerActivity.CPU], profile_memory=True):\n    torch.ones(4) @ torch.ones(4)\n")


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def test_profiler_lines_are_silenced_and_would_otherwise_appear():
    # control: without dpunet's setting Kineto prints its lines (so the capture below can see them)
    loud = _run([sys.executable, "-c", PROFILE.format(before="")])
    assert "profiler_start" in loud.stdout + loud.stderr
    quiet = _run([sys.executable, "-c", PROFILE.format(
        before="from dpunet.utils.quiet import quiet_profiler_logs\nquiet_profiler_logs()\n")])
    assert quiet.returncode == 0 and "USDT" not in quiet.stdout + quiet.stderr


def test_cpu_benchmark_output_has_no_profiler_lines(tmp_path):
    proc = _run([sys.executable, "-m", "dpunet.benchmark.engine_bench", "--device", "cpu", "--preset", "cpu",
                 "--steps", "1", "--warmup", "0", "--nets", "0", "--methods", "fast", "--extra-k", "0"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "dpunet fast" in proc.stdout  # the table was printed, so the profiled step ran
    assert "USDT" not in out and "profiler_start" not in out


def test_accountant_warnings_and_absl_logs_are_counted_and_summarised_once():
    lines: list[str] = []
    with accounting.accountant_warnings_summary("a test run", report=lines.append):
        for _ in range(5):
            with accounting._quiet():
                warnings.warn("failed to converge (test)")
                logging.getLogger("absl").warning("_compute_log_a_frac failed to converge after %d iterations", 7)
                warnings.warn("harmless division", RuntimeWarning)  # numpy-style noise: dropped
    assert sorted(lines) == ["the privacy accountant warned 5 time(s) during a test run: _compute_log_a_frac "
                             "failed to converge after 7 iterations",
                             "the privacy accountant warned 5 time(s) during a test run: failed to converge (test)"]


def test_real_rdp_order_warnings_become_one_line(capsys):
    accounting._cached_epsilon.cache_clear()
    with accounting.accountant_warnings_summary("calibration"):
        for sigma in (40.0, 50.0, 60.0):  # large noise: the optimal RDP order is the largest one offered
            accounting.epsilon_spent(sigma, 0.01, 10, 1e-5, "rdp")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warned 3 time(s) during calibration: Optimal order is the largest alpha" in err[0]


def test_a_short_training_run_prints_no_line_twice(tmp_path, use_roots, capfd):
    from tests.conftest import plan_synthetic_task
    from dpunet.training import cli

    use_roots(plan_synthetic_task(tmp_path, "-c", "2d", "--width", "0.25", "--steps", "25"))
    capfd.readouterr()
    with pytest.raises(SystemExit) as done:
        cli.main(["990", "0", "--eps", "8", "-c", "2d", "--init-from", "none", "--no-validation"])
    out, err = capfd.readouterr()
    assert done.value.code == 0, err[-2000:]
    # progress bars redraw with \r; every other line, on either stream, is said once
    lines = [ln for ln in (out + err).replace("\r", "\n").splitlines() if ln.strip() and "step/s" not in ln
             and not ln.startswith("train ")]
    repeated = [ln for ln, n in Counter(lines).items() if n > 1]
    assert not repeated, repeated
    assert "USDT" not in out + err and "privacy: epsilon" in out
