#!/usr/bin/env python3
"""Speed and time-to-quality benchmarks against the plain-PyTorch reference, in one run.

Every figure is a ratio against ``shared/bench/ref_loop.py`` measured in the same
invocation (machines are shared; absolute speeds drift). Each measurement runs in its own
subprocess, one after another, never in parallel.

    python scripts/bench.py --short            # < 2 minutes: throughput ratios on PTB
    python scripts/bench.py throughput         # target 1 with more steps
    python scripts/bench.py ptb-fast           # target 2: time to valid ppl <= 120
    python scripts/bench.py wikitext2          # target 3: adaptive softmax vs reference
    python scripts/bench.py shakespeare        # target 4: val loss <= 1.47 within 80 s
    python scripts/bench.py ptb-small          # target 5: Zaremba small, full 13 epochs (long)

Options: --ref PATH (ref_loop.py), --data DIR (folder with ptb/, wikitext-2/, tinyshakespeare/),
--out DIR (run directories and a results JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = [ROOT / "data", ROOT.parent / "shared" / "data"]
DEFAULT_REF = ROOT.parent / "shared" / "bench" / "ref_loop.py"

# The reference recipe's model (PyTorch word_language_model defaults, ref_loop.py).
IDENTICAL = ["data.level=word", "data.eos=line", "model.cell=lstm", "model.embedding_size=200",
             "model.hidden_size=200", "model.num_layers=2", "model.dropout=0.2", "model.forget_bias=null",
             "train.batch_size=20", "train.bptt=35", "train.optimizer=sgd", "train.lr=20",
             "train.clip_grad_norm=0.25", "train.lr_schedule=constant", "train.eval_every=null"]


def find_data(name: str, given: str | None) -> Path:
    roots = [Path(given)] if given else DEFAULT_DATA
    for r in roots:
        if (r / name).exists():
            return r / name
    sys.exit(f"bench: corpus {name} not found under {', '.join(map(str, roots))} "
             f"(python scripts/download_data.py {name})")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_ref(ref: Path, train_txt: Path, steps: int, bf16: bool = False, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, str(ref), str(train_txt), "--steps", str(steps)] + (["--bf16"] if bf16 else []) + \
        (extra or [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_rnnlm(run_dir: Path, data: Path, overrides: list[str], config: str | None = None,
              timeout: float | None = None) -> dict:
    """Train in a subprocess; return the end event and the list of events."""
    cmd = [sys.executable, "-m", "rnnlm", "train", "--out", str(run_dir), "--data", str(data), "--no-progress"]
    if config:
        cmd += ["--config", config]
    t0 = time.perf_counter()
    res = subprocess.run(cmd + overrides, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"bench: rnnlm train failed:\n{res.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"events": events, "end": events[-1], "wall": wall}


def steady_tokens_per_sec(events: list[dict], skip_first: int = 1) -> float:
    """Tokens/s over the train events after the first (warm-up) interval."""
    tr = [e for e in events if e["event"] == "train"][skip_first:]
    if not tr:
        return float("nan")
    toks = 0.0
    secs = 0.0
    prev = [e for e in events if e["event"] == "train"][skip_first - 1]["tokens"] if skip_first else 0
    for e in tr:
        n = e["tokens"] - prev
        prev = e["tokens"]
        toks += n
        secs += n / e["tokens_per_sec"]
    return toks / secs


def throughput(args, out: Path, steps: int) -> dict:
    ptb = find_data("ptb", args.data)
    warm = 10
    results = {}
    results["ref_fp32"] = run_ref(args.ref, ptb / "train.txt", steps)["tokens_per_sec"]
    for prec in ("fp32", "bf16"):
        r = run_rnnlm(out / f"tp-{prec}", ptb, IDENTICAL + [f"train.precision={prec}", f"train.max_steps={warm + steps}",
                                                           f"train.log_every={warm}", "train.eval_max_tokens=2000"])
        results[f"rnnlm_{prec}"] = steady_tokens_per_sec(r["events"])
    results["ref_bf16"] = run_ref(args.ref, ptb / "train.txt", steps, bf16=True)["tokens_per_sec"]
    results["ref_fp32_again"] = run_ref(args.ref, ptb / "train.txt", steps)["tokens_per_sec"]
    ref = (results["ref_fp32"] + results["ref_fp32_again"]) / 2
    results["ratio_fp32"] = results["rnnlm_fp32"] / ref
    results["ratio_bf16"] = results["rnnlm_bf16"] / ref
    print(f"throughput, PTB 2x200 LSTM, {steps} steps after {warm} warm-up:")
    print(f"  reference fp32   {results['ref_fp32']:>9,.0f} tok/s  (again: {results['ref_fp32_again']:,.0f})")
    print(f"  reference bf16   {results['ref_bf16']:>9,.0f} tok/s")
    print(f"  rnnlm fp32       {results['rnnlm_fp32']:>9,.0f} tok/s  = {results['ratio_fp32']:.2f}x reference fp32")
    print(f"  rnnlm bf16       {results['rnnlm_bf16']:>9,.0f} tok/s  = {results['ratio_bf16']:.2f}x reference fp32")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=[], help="throughput ptb-fast wikitext2 shakespeare ptb-small")
    ap.add_argument("--short", action="store_true", help="the < 2 minute day-to-day check")
    ap.add_argument("--ref", type=Path, default=DEFAULT_REF)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    if not args.ref.is_file():
        sys.exit(f"bench: reference recipe not found: {args.ref} (--ref PATH)")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    out.mkdir()
    print(f"# {date.today()} · {cpu_name()} · {os.cpu_count()} cores · python {platform.python_version()}")
    import torch
    print(f"# torch {torch.__version__} · threads {torch.get_num_threads()}")
    results: dict = {"date": str(date.today()), "cpu": cpu_name(), "torch": torch.__version__}
    what = args.what or (["throughput"] if args.short else [])
    if not what:
        ap.error("say what to measure, or --short")
    for w in what:
        if w == "throughput":
            results["throughput"] = throughput(args, out, 60 if args.short else 200)
        elif w in TARGETS:
            results[w] = TARGETS[w](args, out)
        else:
            ap.error(f"unknown measurement {w!r}; choose from throughput, {', '.join(TARGETS)}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")


TARGETS: dict = {}

if __name__ == "__main__":
    main()
