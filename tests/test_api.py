"""The Python API: the examples of documentation/api.md run as written (synthetic task, a few steps), and the
commands are wrappers of the API (they call it, with the arguments they parsed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dpunet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def documented_examples() -> list[str]:
    text = (REPO / "documentation" / "api.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_import_dpunet_is_light_and_the_api_is_attached_lazily():
    import subprocess
    import sys

    code = ("import sys, dpunet; assert 'torch' not in sys.modules, 'import dpunet loaded torch'; "
            "f = dpunet.train; assert f.__module__ == 'dpunet.api' and callable(dpunet.Run); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    with pytest.raises(AttributeError):
        dpunet.no_such_function  # noqa: B018


def test_documented_examples_run(tmp_path, monkeypatch, capsys):
    examples = documented_examples()
    assert len(examples) >= 5
    monkeypatch.chdir(tmp_path)
    for key in ("raw", "preprocessed", "results"):
        monkeypatch.delenv(f"DPUNET_{key.upper()}", raising=False)  # the first example sets them
    namespace: dict = {}
    for i, code in enumerate(examples):
        try:
            exec(compile(code, f"documentation/api.md example {i + 1}", "exec"), namespace)
        except Exception as e:  # name the example that failed
            raise AssertionError(f"example {i + 1} of documentation/api.md failed: {type(e).__name__}: {e}") from e
    run, summary, result = namespace["run"], namespace["summary"], namespace["result"]
    # independent checks of what the examples claim, from the files themselves
    assert run.folder == tmp_path / "dpunet_data" / "results" / "Task990_Synthetic3D" / run.folder.parent.name / "fold_0"
    assert run.release_file == run.folder / "release" / "model_release.pt" and run.release_file.is_file()
    assert run.private_folder == run.folder / "private" and (run.private_folder / "checkpoint_latest.pt").is_file()
    assert run.privacy_report["steps_taken"] == 3 and 0 < run.epsilon_spent <= 8
    assert run.validation is not None and run.options["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "predictions_imagesTs").glob("*.nii.gz")) == \
        [f"{c}.nii.gz" for c in sorted(result.case_ids)] and len(result.case_ids) == 2
    assert summary["n_cases"] == 16 and (tmp_path / "predictions_imagesTr" / "summary.json").is_file()
    narrow = namespace["narrow"]  # a run whose folder name carries its width and seed: predict(run=) found it
    assert narrow.folder.parent.name == "unet__2d__epsinf__w0.5__seed1"
    assert len(list((tmp_path / "predictions_narrow").glob("*.nii.gz"))) == 2
    out = capsys.readouterr().out
    assert "planned: N" in out and "cases, foreground Dice" in out


def test_train_refuses_unknown_options_before_any_work(tmp_path, monkeypatch):
    from dpunet.utils.errors import DpunetError

    monkeypatch.setenv("DPUNET_PREPROCESSED", str(tmp_path))
    with pytest.raises(DpunetError, match=r"unknown option\(s\) \['stpes'\]"):
        dpunet.train(990, 0, epsilon=8, stpes=3)


@pytest.mark.parametrize("module, argv, function, expected", [
    ("dpunet.training.cli", ["4", "0", "--eps", "8", "-c", "2d", "--steps", "7", "--continue"], "train",
     ((("4", "0", 8.0, "2d"), {"resume": True, "steps": 7}))),
    ("dpunet.inference.cli", ["-i", "in", "-o", "out", "-d", "Dataset004_Hippocampus", "-f", "0", "--eps", "inf"],
     "predict", ((("in", "out", "Dataset004_Hippocampus", None, ["0"], float("inf"), "unet"), {"step_size": 0.5}))),
    ("dpunet.evaluation.cli", ["-ref", "r", "-pred", "p", "-t", "4", "--nsd-tolerance", "2"], "evaluate",
     (((Path("r"), Path("p"), "4"), {"nsd_tolerance": 2.0}))),
    ("dpunet.pipeline.cli", ["-d", "4", "-c", "2d", "--eps", "3", "--steps", "9", "--no-preprocess"],
     "plan_and_preprocess", ((("4", ["2d"], 3.0), {"steps": 9, "preprocess": False}))),
])
def test_commands_call_the_api(module, argv, function, expected, monkeypatch):
    import importlib

    import dpunet.api

    calls = []

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise Stop

    command = importlib.import_module(module)  # imported before the patch: a command must look the API up per call
    monkeypatch.setattr(dpunet.api, function, fake)
    with pytest.raises(Stop):
        command.main.__wrapped__(argv)
    (args, kwargs), = calls
    want_args, want_kwargs = expected
    assert args == want_args
    assert {k: kwargs[k] for k in want_kwargs} == want_kwargs
