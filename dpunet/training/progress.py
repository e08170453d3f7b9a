"""training_log.csv (one row per step) and progress.png (loss, epsilon and validation Dice curves)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dpunet.utils.files import atomic_write_with, write_text

LOG_COLUMNS = ("step", "epsilon_spent", "patients_sampled", "loss_noisy_step", "fraction_clipped",
               "nonfinite_patients", "learning_rate", "seconds")


class TrainingLog:
    """The rows in memory; with `write_through` each appended row also goes to the file at once, so a kill
    loses no logged step (a resumed run truncates the file back to its checkpoint)."""

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None, write_through: bool = False) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.write_through = write_through

    def append(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k, "") for k in LOG_COLUMNS}
        self.rows.append(row)
        if self.write_through:
            new_file = not self.path.is_file()
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                if new_file:
                    writer.writeheader()
                writer.writerow(row)

    def truncate(self, step: int) -> None:
        """Drop rows after `step` (they belong to work lost when a run was interrupted)."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(buf.getvalue(), self.path)

    @classmethod
    def read(cls, path: Path, write_through: bool = False) -> "TrainingLog":
        if not path.is_file():
            return cls(path, write_through=write_through)
        with open(path) as f:
            return cls(path, list(csv.DictReader(f)), write_through)


def plot_progress(log: TrainingLog, validation: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in log.rows]
    losses = [float(r["loss_noisy_step"]) if r["loss_noisy_step"] not in ("", None) else float("nan")
              for r in log.rows]
    eps = [(int(r["step"]), float(r["epsilon_spent"])) for r in log.rows if r["epsilon_spent"] not in ("", None)]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, losses, lw=0.8, label="loss (noisy step)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    if validation:
        twin = ax[0].twinx()
        twin.plot([s for s, _ in validation], [d for _, d in validation], "o-", color="C2", label="val Dice")
        twin.set_ylabel("validation mean Dice")
        twin.set_ylim(0, 1)
    ax[0].set_title(title)
    if eps and all(e[1] != float("inf") for e in eps):
        ax[1].plot([s for s, _ in eps], [e for _, e in eps], color="C3")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("epsilon spent (PRV)")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
