"""dpunet_study: the architecture x epsilon x dataset grid as one declarative YAML file, run cell by cell through
submitit (local processes or Slurm), resumable, summarised in results.csv, report.md and plots
(documentation/study.md)."""
from dpunet.study.spec import Cell, StudySpec, load_spec

__all__ = ["Cell", "StudySpec", "load_spec"]
