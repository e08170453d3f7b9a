"""The acceptance run on real data: at epsilon 8, the default pipeline (plan, pretraining on random-process
images, DP-SGD fine-tuning) learns hippocampus 2d well above an untrained network. About 10 minutes on 2 CPU
cores: `bash run_tests.sh -m slow -k hippocampus`."""
from __future__ import annotations

import pytest

from dpunet.pipeline import cli as plan_and_preprocess
from dpunet.training.config import merge_plan_and_options
from dpunet.training.trainer import DPTrainer, load_training_inputs

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def _fold0_dice(tmp_path, **options) -> float:
    _, _, plan_config, _, _ = load_training_inputs("4", "2d")
    opts = dict(task="4", fold="0", configuration="2d", width=0.5, steps=300, patients_per_step=64,
                patches_per_patient=4, patients_per_micro_batch=64, engine="fast", device="cpu")
    opts.update(options)
    cfg = merge_plan_and_options(plan_config, opts)
    name = "_".join(f"{k}{v}" for k, v in sorted(options.items()))
    result = DPTrainer(cfg, output_dir=tmp_path / name).run()
    return result["validation"]["foreground_mean"]["Dice"]


def test_epsilon_8_learns_well_above_an_untrained_network(hippocampus_dir, tmp_path, monkeypatch):
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"DPUNET_{key.upper()}", str(tmp_path / key))
    (tmp_path / "raw" / "Task04_Hippocampus").symlink_to(hippocampus_dir.resolve())
    plan_and_preprocess.main.__wrapped__(["-t", "4", "-c", "2d", "--eps", "8", "--width", "0.25", "-np", "2"])

    untrained = _fold0_dice(tmp_path, epsilon=float("inf"), steps=1, learning_rate=1e-12, warmup_steps=0,
                            init_from="none")
    private = _fold0_dice(tmp_path, epsilon=8.0)  # plan defaults: pretrained start, lr 1e-2
    print(f"hippocampus 2d fold 0, mean foreground Dice: untrained {untrained:.3f}, epsilon 8 {private:.3f}")
    assert untrained < 0.1
    assert private > max(0.25, 3 * untrained)
