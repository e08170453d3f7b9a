"""Shared fixtures. Tests that need ../shared skip cleanly where it is absent."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# OpenMP threads busy-wait by default: on a loaded 2-core machine that slows every test several-fold
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPUNET_SHARED", REPO.parent / "shared"))

# tiny test networks run fastest single-threaded; subprocess-based tests keep OMP_NUM_THREADS
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny nets: intra-op threads only add synchronisation (10x slower on a busy machine). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`; the previous thread count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session", autouse=True)
def temporary_folder_inside_basetemp(tmp_path_factory) -> Path:
    """The system's temporary folder, for the tests and every process they start (torchrun's torchelastic_*
    folders, spawned workers), is a folder inside pytest's base folder: pytest removes it (pytest.ini)."""
    folder = tmp_path_factory.mktemp("system_tmp", numbered=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder))
        mp.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture
def hippocampus_dir() -> Path:
    return shared_path("data", "Task04_Hippocampus")


@pytest.fixture
def dpunet_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """DPUNET_RAW/PREPROCESSED/RESULTS pointing into a fresh temporary folder."""
    roots = {}
    for key in ("raw", "preprocessed", "results"):
        roots[key] = tmp_path / key
        roots[key].mkdir()
        monkeypatch.setenv(f"DPUNET_{key.upper()}", str(roots[key]))
    return roots


def plan_synthetic_task(base: Path, *plan_args: str) -> dict[str, Path]:
    """The 16-case synthetic task (2 cases per patient, 8 patients) under `base`, planned and preprocessed in
    process with `dpunet_plan_and_preprocess -t 990 -np 1 *plan_args`; returns DPUNET_* roots."""
    from dataset_conversion.generate_synthetic import generate_synthetic_task
    from dpunet.pipeline import cli as plan_and_preprocess

    roots = {"raw": base / "raw", "preprocessed": base / "pre", "results": base / "res"}
    generate_synthetic_task(roots["raw"], num_cases=16, cases_per_patient=2, base_shape=(10, 32, 32),
                            spacing=(2.0, 1.0, 1.0), seed=5)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in roots.items():
            mp.setenv(f"DPUNET_{k.upper()}", str(v))
        with pytest.raises(SystemExit) as done:
            plan_and_preprocess.main(["-t", "990", "-np", "1", *plan_args])
        assert done.value.code == 0
    return roots


@pytest.fixture
def use_roots(monkeypatch):
    """Point DPUNET_* at the given roots for one test: `use_roots(roots)`."""
    def point(roots: dict[str, Path]) -> dict[str, Path]:
        for k, v in roots.items():
            monkeypatch.setenv(f"DPUNET_{k.upper()}", str(v))
        return roots
    return point
