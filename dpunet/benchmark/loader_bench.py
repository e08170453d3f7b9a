"""dpunet_bench_loader -t TASK [-c CONFIG] [--workers 0 2] [--steps 5]: does the data pipeline keep up?

Measures, on the task's preprocessed data, patients per second delivered by the loader alone (patient sampling,
K patches, augmentation; inline and with background workers) against patients per second consumed by a training
step (the per-patient gradient engine on the same micro-batches), in one run on one device."""
from __future__ import annotations

import argparse
import math
import time

import torch

from dpunet.training.config import merge_plan_and_options
from dpunet.training.loader_workers import measure_loader_throughput
from dpunet.training.trainer import DPTrainer, load_training_inputs
from dpunet.utils.errors import cli_entry


def step_throughput(trainer: DPTrainer, patient_ids: list[str], steps: int) -> float:
    """Patients per second the engine consumes (data prepared beforehand, so only compute is timed)."""
    batch = trainer.patch_sampler.make_patient_batch(patient_ids, 0, trainer.cfg.seed)
    batch = trainer._to_device(batch)
    trainer.engine.accumulate(batch)  # warm-up (and the fast engine's one-off implementation timing)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.engine.zero()
        trainer.engine.accumulate(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(patient_ids) / (time.perf_counter() - start)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpunet_bench_loader", description=__doc__)
    parser.add_argument("-t", "--task", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--patients", type=int, default=8, help="patients per measured micro-batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--engine", default="fast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    _, _, plan_config, _, _ = load_training_inputs(args.task, args.configuration)
    cfg = merge_plan_and_options(plan_config, {
        "task": args.task, "fold": "0", "epsilon": 8.0, "configuration": args.configuration,
        "engine": args.engine, "device": args.device, "patients_per_micro_batch": args.patients,
        "validation": False, "init_from": "none"})  # the step's cost does not depend on the initial weights
    trainer = DPTrainer(cfg)
    patients = sorted(trainer.patients)[:args.patients]
    consumed = step_throughput(trainer, patients, args.steps)
    print(f"{trainer.task_name} {args.configuration}: K={cfg.patches_per_patient}, {len(patients)} patients "
          f"per micro-batch, device {args.device}, {torch.get_num_threads()} torch threads")
    print(f"training step ({args.engine} engine) consumes {consumed:8.2f} patients/s")
    for workers in args.workers:
        delivered = measure_loader_throughput(trainer.patch_sampler, patients, args.steps, num_workers=workers,
                                              patients_per_micro_batch=args.patients, seed=cfg.seed)
        ratio = delivered / consumed if consumed > 0 else math.inf
        print(f"loader, {workers} worker(s), delivers     {delivered:8.2f} patients/s ({ratio:.2f}x consumption)")
    trainer.engine.close()
    return 0


if __name__ == "__main__":
    main()
