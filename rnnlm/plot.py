"""Loss curves of a run: train and validation loss against training tokens seen."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

from .errors import RunError, UsageError


def read_metrics(run_dir: str | Path) -> list[dict]:
    run = Path(run_dir)
    if not run.exists():
        raise UsageError(f"run directory not found: {run_dir}")
    if not run.is_dir():
        raise UsageError(f"{run_dir} is a file; give the run directory (the one holding metrics.jsonl)")
    path = run / "metrics.jsonl"
    if path.exists() and not path.is_file():
        raise UsageError(f"{path} is not a regular file; is {run_dir} an rnnlm run directory?")
    if not path.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl; is it an rnnlm run directory?")
    events, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                torn += 1  # a line torn by a crash: skip it, keep the rest
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                torn += 1
    if torn and not events:
        raise UsageError(f"{path} is not an rnnlm metrics log: none of its {torn} lines is a JSON event")
    return events


_X = {"tokens": "training tokens", "time": "time since the start (s), evaluations included",
      "step": "optimizer steps"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _label(name: str) -> str:
    """A run directory's name as text matplotlib draws: undecodable bytes escaped (a non-UTF-8 name),
    and '$' escaped (matplotlib would read $...$ as mathematics, and fail on a lone one)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace").replace("$", r"\$")


def plot_run(run_dir: str | Path, out: str | Path | None = None, x: str = "tokens") -> Path:
    """Draw loss.png (or `out`) from metrics.jsonl; returns the image path."""
    return plot_runs([run_dir], out if out is not None else Path(run_dir) / "loss.png", x)


def plot_runs(run_dirs: list[str | Path], out: str | Path, x: str = "tokens") -> Path:
    """Train and validation loss of one or more runs on one chart, against `x` (tokens, time or step)."""
    if x not in _X:
        raise UsageError(f"--x must be one of {', '.join(_X)}, not {x!r}")
    curves = []
    for run_dir in run_dirs:
        events = read_metrics(run_dir)
        # (metrics of older versions may lack a key; a hand-edited or foreign line may hold other values)
        has = [e for e in events if _number(e.get(x)) and _number(e.get("loss"))]
        train = [(e[x], e["loss"]) for e in has if e.get("event") == "train"]
        valid_ev = [e for e in has if e.get("event") == "eval" and e.get("split") == "valid"]
        valid = [(e[x], e["loss"]) for e in valid_ev]
        if not train and not valid:
            raise UsageError(f"{run_dir}/metrics.jsonl holds no train or eval events to plot"
                             + ("" if x == "tokens" else f" against {x}"))
        # train.averaging=nt: the validation that switched averaging on (the one before the first
        # averaged validation), where the validation curve turns from raw weights to their mean
        first = next((i for i, e in enumerate(valid_ev) if e.get("averaged") is True), None)
        switch = None if first is None else valid[max(first - 1, 0)][0]
        curves.append((_label(Path(run_dir).resolve().name), train, valid, switch))

    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        raise UsageError(f"--out {out} names a folder; give an image path such as {path / 'loss.png'}")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {path.parent} does not exist")
    if path.name.lower() == ".png":
        raise UsageError(f"--out {out}: give a file name, such as {path.with_name('loss.png')}")
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the image is written as PNG; give a name ending in .png")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    single = len(curves) == 1
    for k, (name, train, valid, switch) in enumerate(curves):
        c_train, c_valid = ("tab:blue", "tab:orange") if single else (f"C{k % 10}", f"C{k % 10}")
        prefix = "" if single else f"{name} "
        if train:  # a short series gets markers: a single point drawn as a line would not show at all
            ax.plot(*zip(*train), label=f"{prefix}train", color=c_train, linewidth=1.2, alpha=1.0 if single else 0.6,
                    marker="." if len(train) <= 30 else None)
        if valid:
            ax.plot(*zip(*valid), label=f"{prefix}valid", color=c_valid, marker="o", markersize=3 if single else 5,
                    linewidth=1.5, linestyle="-" if single else "--")
        if switch is not None:
            ax.axvline(switch, color=c_valid, linestyle=":", linewidth=1.2,
                       label=f"{prefix}weight averaging (NT-ASGD) from here")
    losses = [v for _, train, valid, _ in curves for _, v in train + valid if math.isfinite(v)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 50:
        ax.set_yscale("log")  # a blow-up (1e12 nats) would flatten every other point onto the axis
    ax.set_xlabel(_X[x])
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(curves[0][0] if single else "loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8 if not single else None)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only place: nothing was written there to remove
            pass
        # the user's choice of place (no permission, read-only): usage; a full or failing disk: a run error
        kind = UsageError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else RunError
        raise kind(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
