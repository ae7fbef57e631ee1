"""Compare the jobs of a sweep:

    python -m svlm.report outputs/multirun/<time>

prints a table of every job's overrides and final metrics, and writes
`report.md`, `report.json` and `loss_curves.png` (train and validation loss of
every job, overlaid, one panel a stage) into the sweep folder. A multirun
(`python train.py -m ...`) does this by itself when its last job ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

STAGES = ("stage1", "stage2")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_summary(job: Path) -> dict:
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    row: dict = {"job": job.name, "overrides": overrides or []}
    for stage in STAGES:
        metrics = read_metrics(job / stage / "metrics.jsonl")
        train = [m for m in metrics if "train/loss" in m]
        val = [m for m in metrics if "val/loss" in m]
        if train:
            row[f"{stage}/steps"] = train[-1]["step"]
            row[f"{stage}/train_loss"] = train[-1]["train/loss"]
        if val:
            row[f"{stage}/val_loss"] = val[-1]["val/loss"]
            row[f"{stage}/val_exact"] = val[-1].get("val/exact")
        row[f"{stage}/finished"] = (job / stage / "model" / "model.safetensors").is_file() if train else None
    return row


def jobs_of(sweep: Path) -> list[Path]:
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))


def table(rows: list[dict]) -> str:
    columns = ["job", "overrides"] + [
        c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("job", "overrides") and "finished" not in c
    ]

    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def draw_benchmarks(ax, runs_metrics: list[list[dict]]) -> None:
    """Each run's benchmark headlines (bench/<task>/<metric>, stage.benchmarks) on a second
    axis, as a share of the best score (dotted, one marker a task)."""
    from svlm.benchmarks.tasks import TASKS

    twin = None
    for i, metrics in enumerate(runs_metrics):
        for j, (name, task) in enumerate(TASKS.items()):
            key, best = f"bench/{name}/{task.headline[0]}", task.headline[1]
            points = [(m["step"], m[key] / best) for m in metrics if key in m]
            if points:
                twin = twin or ax.twinx()
                twin.plot(*zip(*points), color=f"C{i % 10}", linestyle=":", marker="v^sDo"[j % 5], markersize=4,
                          label=f"{name} {task.headline[0]}")  # fmt: skip
    if twin is not None:
        twin.set_ylim(0, 1)
        twin.set_ylabel("benchmark score / best possible")
        twin.legend(fontsize=7, loc="upper right")


def draw_curves(runs: list[tuple[str, Path]], out: Path, title: str) -> Path:
    """Train (solid) and validation (dashed) loss of each (label, run folder), one
    panel a stage, and any benchmark scores (dotted, second axis), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any((run / s / "metrics.jsonl").is_file() for _, run in runs)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(6 * max(1, len(stages)), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for i, (label, run) in enumerate(runs):
            metrics = read_metrics(run / stage / "metrics.jsonl")
            colour = f"C{i % 10}"
            train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
            val = [(m["step"], m["val/loss"]) for m in metrics if "val/loss" in m]
            if train:
                ax.plot(*zip(*train), color=colour, linewidth=1.2, marker="." if len(train) < 5 else None,
                        label=f"{label} train" if label else "train")  # fmt: skip
            if val:
                ax.plot(*zip(*val), color=colour, linestyle="--", marker="o", markersize=3,
                        label=f"{label} validation" if label else "validation")  # fmt: skip
        draw_benchmarks(ax, [read_metrics(run / stage / "metrics.jsonl") for _, run in runs])
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (cross entropy on answer tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(sweep: str | Path) -> dict:
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: no such sweep folder")
    jobs = jobs_of(sweep)
    if not jobs:
        raise FileNotFoundError(f"{sweep}: no job folders (with .hydra/) in it")
    rows = [job_summary(j) for j in jobs]
    # What the jobs share is said once; each row shows what it changed.
    common = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)]
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in common)
    text = (f"common overrides: {' '.join(common) or '(none)'}\n\n" if len(rows) > 1 else "") + table(rows)
    (sweep / "report.md").write_text(f"# Sweep {sweep}\n\n{text}\n\n![loss curves](loss_curves.png)\n")
    (sweep / "report.json").write_text(json.dumps(rows, indent=2))
    draw_curves([(r["overrides"] or f"job {r['job']}", j) for r, j in zip(rows, jobs)], sweep / "loss_curves.png",
                str(sweep))  # fmt: skip
    print(text)
    print(f"\nreport: {sweep / 'report.md'}, curves: {sweep / 'loss_curves.png'}")
    return {"rows": rows, "png": sweep / "loss_curves.png"}


class SweepReport(Callback):
    """Hydra callback: the report of a multirun, when its last job has ended."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            report(config.hydra.sweep.dir)
        except FileNotFoundError as e:
            print(f"no sweep report: {e}")
