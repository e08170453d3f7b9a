"""dpunet_predict -i IN -o OUT -t TASK [-c CONFIG] [-f 0 1 2 3 4 | all] [--eps 8] [--arch NAME]
[--disable_tta] [--step_size 0.5] [--device cpu|cuda] [-np N] [--save_probabilities]

Segments every image in IN (MSD `<case>.nii.gz`, or nnU-Net `<case>_0000.nii.gz`, `_0001`, ... channel files)
with the ensemble of the chosen fold models of run <arch>__<config>__eps<e>, and writes `<case>.nii.gz` in each
input's own geometry to OUT, plus OUT/privacy_note.json and .md (the ensemble's privacy guarantee)."""
from __future__ import annotations

import argparse

from dpunet.utils.errors import cli_entry

# torch and the predictor are imported inside main(): worker processes are spawned, and a spawned worker
# re-imports the __main__ module, which should stay light


def _step_size(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"step size must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from dpunet.inference.predictor import DEFAULT_FOLDS
    from dpunet.utils.arguments import parse_epsilon

    p = argparse.ArgumentParser(prog="dpunet_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="folder of images to segment")
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations (created)")
    p.add_argument("-t", "-d", "--task", "--dataset", dest="task", required=True,
                   help="task id (4) or name (Task04_Hippocampus, Dataset004_Hippocampus)")
    p.add_argument("-c", "--configuration", default=None, help="plan configuration (default 3d_fullres, else 2d)")
    p.add_argument("-f", "--folds", nargs="+", default=list(DEFAULT_FOLDS),
                   help="fold models to ensemble: any of 0 1 2 3 4, or all (default 0 1 2 3 4)")
    p.add_argument("--eps", type=parse_epsilon, default=8.0, help="epsilon of the run to use (default 8; inf)")
    p.add_argument("--arch", default="unet", help="architecture of the run, as given to dpunet_train (default unet; list: dpunet_archs)")
    p.add_argument("--disable_tta", "--disable-tta", dest="disable_tta", action="store_true",
                   help="no mirroring test-time augmentation (2^axes times faster)")
    p.add_argument("--step_size", "--step-size", dest="step_size", type=_step_size, default=0.5,
                   help="tile step as a fraction of the patch size (default 0.5)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("-np", "--num-processes", dest="num_processes", type=int, default=2,
                   help="worker processes for reading/preprocessing and export (default 2; 0 or 1: none)")
    p.add_argument("--save_probabilities", "--save-probabilities", dest="save_probabilities", action="store_true",
                   help="also write <case>.npz (float16 softmax in the input's grid) and <case>.json")
    p.add_argument("--tile_batch_size", "--tile-batch-size", dest="tile_batch_size", type=int, default=4,
                   help="tiles per network forward pass (default 4)")
    from dpunet.evaluation.cross_validation import add_run_identity_arguments

    add_run_identity_arguments(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from dpunet.evaluation.cross_validation import run_identity_kwargs
    from dpunet.api import predict

    args = build_parser().parse_args(argv)
    result = predict(args.input, args.output, args.task, args.configuration, args.folds, args.eps, args.arch,
                     step_size=args.step_size, use_mirroring=not args.disable_tta,
                     device=args.device, num_processes=args.num_processes,
                     save_probabilities=args.save_probabilities, tile_batch_size=max(1, args.tile_batch_size),
                     identity=run_identity_kwargs(args))
    note = result.privacy_note
    print(f"{len(result.case_ids)} case(s) segmented -> {result.output_folder}")
    if note.get("private"):
        eps = note["epsilon"]
        prv = eps["prv"] if isinstance(eps["prv"], str) else f"{eps['prv']:.4g}"
        rdp = eps["rdp"] if isinstance(eps["rdp"], str) else f"{eps['rdp']:.4g}"
        print(f"privacy: epsilon {prv} (PRV) / {rdp} (RDP) at delta {note['delta']:g} per patient, "
              f"up to {note['max_models_per_patient']} model(s) per patient; see privacy_note.md")
    else:
        print("privacy: " + note.get("statement", "unknown"))
    return 0


if __name__ == "__main__":
    main()
