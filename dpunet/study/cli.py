"""dpunet_study run|status|report|commands|run-cell SPEC [--folder DIR]

  run SPEC         run every pending cell through the spec's executor (local: waits; slurm: submits a job array).
                   Resumable: done cells are skipped, an interrupted cell continues from its checkpoint, a failed
                   cell is recorded (cells/<key>/error.txt) and retried at the next run.
  status SPEC      done / running / failed / interrupted / pending, a progress bar and the estimated time left
  report SPEC      results.csv, report.md and PNG plots in the study folder (or --out)
  commands SPEC    one shell line per pending cell (dpunet_study run-cell ...), for any scheduler
  run-cell SPEC KEY  run one cell in this process (what `commands` prints)

The study folder is the spec's `folder`, else $DPUNET_RESULTS/studies/<name> (documentation/study.md)."""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Optional, Sequence

from dpunet.utils.errors import DpunetError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpunet_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "status", "report", "commands", "run-cell"])
    p.add_argument("spec", help="the study's YAML file, e.g. studies/quick_cpu.yaml")
    p.add_argument("cells", nargs="*", help="run-cell: the cell key(s); run: only these cells")
    p.add_argument("--folder", default=None, help="study folder (replaces the spec's)")
    p.add_argument("--out", default=None, help="report: folder for results.csv, report.md, plots (default: study)")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="TRACKING_URI",
                   help="report: also log every finished cell to MLflow (default store: <study>/mlruns; needs "
                        "pip install mlflow-skinny); the spec's `mlflow` entry does the same")
    p.add_argument("-v", "--verbose", action="store_true", help="status: one line per cell")
    return p


def _commands(spec) -> list[str]:
    from dpunet.study.runner import ENVIRONMENT_KEYS, pending_cells

    env = " ".join(f"{k}={shlex.quote(str(Path(os.environ[k]).resolve()))}" for k in ENVIRONMENT_KEYS
                   if os.environ.get(k))
    folder = f" --folder {shlex.quote(str(spec.folder.resolve()))}"
    threads = spec.executor.get("threads")
    prefix = (f"OMP_NUM_THREADS={threads} " if threads else "") + (env + " " if env else "")
    spec_path = shlex.quote(str(spec.path.resolve()))
    return [f"{prefix}dpunet_study run-cell {spec_path} {c.key}{folder}" for c in pending_cells(spec)]


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    from dpunet.study.spec import load_spec

    args = build_parser().parse_args(argv)
    spec = load_spec(args.spec, args.folder)
    if args.command == "status":
        from dpunet.study.status import format_status

        print(format_status(spec, args.verbose))
    elif args.command == "commands":
        for line in _commands(spec):
            print(line)
    elif args.command == "report":
        from dpunet.study.report import write_report

        result = write_report(spec, Path(args.out) if args.out else None)
        print("written: " + ", ".join(str(p) for p in result["files"]))
        setting = spec.mlflow
        if args.mlflow is not None:  # --mlflow URI replaces the spec's store; a bare --mlflow keeps it
            setting = {"tracking_uri": None, "experiment": None, **(spec.mlflow or {})}
            setting["tracking_uri"] = args.mlflow or setting["tracking_uri"]
        if setting is not None:
            from dpunet.study.tracking import log_cells

            logged = log_cells(result["rows"], spec.name, spec.folder, setting)
            print(f"MLflow ({logged['tracking_uri']}, experiment {logged['experiment']}): {logged['created']} "
                  f"run(s) created, {logged['updated']} updated")
    elif args.command == "run-cell":
        from dpunet.study.cells import run_cell_job

        if not args.cells:
            raise DpunetError("run-cell needs the key of a cell (dpunet_study commands SPEC prints them)")
        failed = [k for k in args.cells if run_cell_job(spec.cell(k), str(spec.folder.resolve()), spec.predict_test,
                                                        spec.executor.get("threads")) != "done"]
        if failed:
            raise DpunetError(f"cell(s) failed: {', '.join(failed)} (see {spec.folder}/cells/<key>/error.txt)")
    else:
        from dpunet.study.runner import run_study

        counts = run_study(spec, args.cells or None)
        print(f"this run: {counts['done']} done, {counts['failed']} failed, {counts['submitted']} submitted")
        from dpunet.study.status import format_status

        print(format_status(spec))
        return 1 if counts["failed"] else 0
    return 0


if __name__ == "__main__":
    main()
