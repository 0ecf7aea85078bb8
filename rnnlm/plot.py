"""Loss curves of a run: train and validation loss against training tokens seen."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl; is it an rnnlm run directory?")
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash: skip it, keep the rest
    return events


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss.png (or `out`) from metrics.jsonl; returns the image path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(run_dir)
    train = [(e["tokens"], e["loss"]) for e in events if e.get("event") == "train"]
    valid = [(e["tokens"], e["loss"]) for e in events if e.get("event") == "eval" and e.get("split") == "valid"]
    if not train and not valid:
        raise UsageError(f"{run_dir}/metrics.jsonl holds no train or eval events to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), label="valid", color="tab:orange", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "loss.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
