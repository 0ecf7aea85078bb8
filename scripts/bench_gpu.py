#!/usr/bin/env python3
"""GPU (CUDA) measurements, each against the reference recipe on the same GPU in the same run.

``shared/bench/ref_loop.py`` is CPU-only, so on a GPU the reference is ``scripts/ref_train.py
--device cuda``: the same recipe (embedding -> nn.LSTM -> linear, full softmax, SGD, clip, state
carried), which is what the PyTorch word_language_model example runs with ``--cuda``.

    python scripts/bench_gpu.py                        # throughput, ptb-small, ptb-medium, profile
    python scripts/bench_gpu.py throughput --seconds 15
    python scripts/bench_gpu.py ptb-medium --medium-time 600

throughput   the identical PTB model (scripts/bench.py's IDENTICAL: 2x200 LSTM, batch 20, bptt 35):
             reference fp32 and bf16 against rnnlm fp32, bf16 and fp16, steady tokens/s after the
             first interval (reference: between its first and last evaluation, evaluation excluded).
ptb-small    configs/ptb-word-small.yaml (Zaremba et al. small, 13 epochs) on the GPU, then test ppl.
ptb-medium   configs/ptb-word-medium.yaml (2x650, 39 epochs; test ppl 82.7 in the paper) with at most
             --medium-time seconds of training; validation ppl per epoch, test ppl of best.pt.
profile      torch.profiler over 40 fp32 steps of the identical model: host time per op, launches/step.
eval-tf32    batched validation of a ptb-small model (ptb-small's own if it ran first, else 2 epochs),
             cuDNN TF32 on/off, the exactness check's
             tolerance fp32's or state_tolerance's: time, tokens re-run, perplexity against batch 1.
graph-memory peak GPU memory of 40 steps at ptb-word-medium's shapes, CUDA graphs off and on.

Options: --data DIR (holding ptb/), --out DIR (run directories and results.json), --seconds S
(training seconds per throughput run), --medium-time S, --precision P (ptb-small/ptb-medium).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import IDENTICAL, ROOT, find_data, run_rnnlm, steady_tokens_per_sec  # noqa: E402


def run_ref_cuda(ptb: Path, seconds: float, bf16: bool, device: str) -> float:
    """The reference recipe on the GPU: steady tokens/s between its first and last evaluation."""
    cmd = [sys.executable, str(ROOT / "scripts" / "ref_train.py"), str(ptb / "train.txt"), str(ptb / "valid.txt"),
           "--device", device, "--max-time", str(seconds), "--eval-every", "300" if device.startswith("cuda") else "5"]
    cmd += ["--bf16"] if bf16 else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    evals = [json.loads(x) for x in out.splitlines() if x.startswith('{"event": "eval"')]
    if len(evals) < 2:
        sys.exit(f"bench_gpu: the reference ran too few steps in {seconds} s to time it (--seconds)")
    a, b = evals[0], evals[-1]
    return (b["tokens"] - a["tokens"]) / (b["train_seconds"] - a["train_seconds"])


def throughput(args, out: Path) -> dict:
    ptb = find_data("ptb", args.data)
    res: dict = {"seconds": args.seconds}
    res["ref_fp32"] = run_ref_cuda(ptb, args.seconds, False, args.device)
    res["ref_bf16"] = run_ref_cuda(ptb, args.seconds, True, args.device)
    # fp32 and bf16 steps replay a CUDA graph (train.cuda_graphs=null: on where it applies); the
    # "eager" rows switch it off; fp16 (GradScaler) always runs eagerly.
    runs = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"],
            "fp32_eager": ["train.precision=fp32", "train.cuda_graphs=false"],
            "bf16_eager": ["train.precision=bf16", "train.cuda_graphs=false"]}
    if args.device == "cuda":
        runs["fp16"] = ["train.precision=fp16"]
    for name, over in runs.items():
        r = run_rnnlm(out / f"tp-{name}", ptb, IDENTICAL + over + [
            f"train.device={args.device}", f"train.max_time={args.seconds}", "train.max_steps=null",
            f"train.log_every={100 if args.device.startswith('cuda') else 5}", "train.eval_max_tokens=2000"])
        res[f"rnnlm_{name}"] = steady_tokens_per_sec(r["events"])
    res["ref_fp32_again"] = run_ref_cuda(ptb, args.seconds, False, args.device)
    ref = (res["ref_fp32"] + res["ref_fp32_again"]) / 2
    print(f"throughput on the GPU, PTB 2x200 LSTM (identical model), {args.seconds:g} s per run:")
    print(f"  reference fp32   {res['ref_fp32']:>9,.0f} tok/s  (again: {res['ref_fp32_again']:,.0f})")
    print(f"  reference bf16   {res['ref_bf16']:>9,.0f} tok/s  = {res['ref_bf16'] / ref:.2f}x reference fp32")
    for name in runs:
        res[f"ratio_{name}"] = res[f"rnnlm_{name}"] / ref
        print(f"  rnnlm {name:<10} {res[f'rnnlm_{name}']:>9,.0f} tok/s  = {res[f'ratio_{name}']:.2f}x reference fp32")
    return res


def _config_run(args, out: Path, name: str, config: str, extra: list[str]) -> dict:
    ptb = find_data("ptb", args.data)
    r = run_rnnlm(out / name, ptb, [f"train.device={args.device}", f"train.precision={args.precision}", *extra],
                  config=str(ROOT / "configs" / config))
    cmd = [sys.executable, "-m", "rnnlm", "eval-perplexity", "--checkpoint", str(out / name),
           "--data", str(ptb / "test.txt"), "--json", "--batch-size", "16", "--device", args.device]
    test = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    valid = [round(e["ppl"], 2) for e in r["events"] if e["event"] == "eval" and e.get("split", "valid") == "valid"]
    end = r["end"]
    res = {"test_ppl": test["ppl"], "best_valid_ppl": end["best_valid_ppl"], "valid_ppl": valid,
           "epochs_completed": end["epochs_completed"], "stop_reason": end["stop_reason"], "wall": r["wall"],
           "train_tokens_per_sec": end["train_tokens_per_sec"]}
    print(f"{config} on the GPU ({args.precision}): test ppl {res['test_ppl']:.2f}, best valid "
          f"{res['best_valid_ppl']:.2f}, {res['epochs_completed']} epochs ({res['stop_reason']}), "
          f"{res['wall']:.0f} s wall, {res['train_tokens_per_sec']:,.0f} tok/s")
    print(f"  valid ppl per evaluation: {valid}")
    return res


def ptb_small(args, out: Path) -> dict:
    return _config_run(args, out, "ptb-small", "ptb-word-small.yaml", [])


def ptb_medium(args, out: Path) -> dict:
    limit = [f"train.max_time={args.medium_time}"] if args.medium_time else []
    return _config_run(args, out, "ptb-medium", "ptb-word-medium.yaml", limit)


def profile(args, out: Path) -> dict:
    """Where an rnnlm step's host time goes on the GPU: torch.profiler over 40 steps of the
    identical model in fp32 (the run's start and its closing evaluation included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rnnlm.config import build_config
    from rnnlm.train import Trainer
    ptb = find_data("ptb", args.data)
    steps = 40
    cfg = build_config(None, [f"data.path={ptb}", *IDENTICAL, f"train.device={args.device}", "train.precision=fp32",
                              f"train.max_steps={steps}", "train.log_every=20", "train.eval_max_tokens=700"])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=acts) as p:
        Trainer(cfg, out / "profile", progress=False).fit()
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out / "profile.txt").write_text(table)
    launches = sum(e.count for e in p.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                   "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    print(f"profile, {steps} fp32 steps of the identical model: {launches / steps:.0f} kernel launches per step")
    print(table)
    return {"launches_per_step": launches / steps}


def eval_tf32(args, out: Path) -> dict:
    """Batched validation (batch 16) of a ptb-word-small model (the one `ptb-small` trained earlier in
    this invocation, else one trained 2 epochs here) with cuDNN's TF32 on and off, the exactness check
    at fp32's tolerance and at the one `state_tolerance` picks, against batch 1."""
    import numpy as np
    import torch

    import rnnlm.evaluate as ev
    from rnnlm.checkpoint import load_model
    from rnnlm.config import build_config
    from rnnlm.train import Trainer
    ptb = find_data("ptb", args.data)
    run = out / "ptb-small"
    if (run / "best.pt").exists():   # ptb-small ran first in this invocation: its fully trained model
        model = "ptb-small (as trained above)"
    else:
        run, model = out / "eval-tf32", "ptb-small, 2 epochs"
        cfg = build_config(ROOT / "configs" / "ptb-word-small.yaml",
                           [f"data.path={ptb}", "train.epochs=2", f"train.device={args.device}"])
        Trainer(cfg, run, progress=False).fit()
    lm = load_model(run / "best.pt", args.device)
    print(f"eval-tf32: the model of {model}")
    ids = ev.text_ids((ptb / "valid.txt").read_text(), lm.tokenizer, lm.vocab)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    chosen, old, rows = ev.state_tolerance, torch.backends.cudnn.allow_tf32, []
    try:
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            for label, batch, tol in (("fp32's 1e-4", 16, lambda d, a: ev.TOL_FP32), ("state_tolerance", 16, chosen),
                                      ("batch 1", 1, chosen)):
                ev.state_tolerance = tol
                info: dict = {}
                sync()
                t = time.perf_counter()
                nll = ev.stream_nll(lm.model, ids, batch_size=batch, device=args.device, info=info)
                sync()
                row = {"tf32": tf32, "check": label, "seconds": round(time.perf_counter() - t, 3),
                       "rerun_tokens": info["rerun_tokens"], "ppl": float(np.exp(nll / len(ids)))}
                rows.append(row)
                print(f"cudnn.allow_tf32={tf32}, {label}: {row['seconds']:.2f} s, {row['rerun_tokens']:,} of "
                      f"{len(ids):,} tokens re-run, ppl {row['ppl']:.6f}", flush=True)
    finally:
        ev.state_tolerance, torch.backends.cudnn.allow_tf32 = chosen, old
    return {"model": model, "tokens": len(ids), "rows": rows}


def graph_memory(args, out: Path) -> dict:
    """Peak GPU memory of 40 training steps at ptb-word-medium's shapes, CUDA graphs off and on."""
    import torch

    from rnnlm.config import build_config
    from rnnlm.train import Trainer
    ptb = find_data("ptb", args.data)
    res = {}
    for graphs in ("false", "true"):
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cfg = build_config(ROOT / "configs" / "ptb-word-medium.yaml",
                           [f"data.path={ptb}", "train.max_steps=40", f"train.device={args.device}",
                            f"train.cuda_graphs={graphs}", "train.eval_every=null", "train.eval_max_tokens=2000"])
        Trainer(cfg, out / f"graph-memory-{graphs}", progress=False).fit()
        mib = (torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20) \
            if args.device == "cuda" else (0.0, 0.0)
        res[f"cuda_graphs={graphs}"] = {"peak_allocated_mib": round(mib[0]), "peak_reserved_mib": round(mib[1])}
        print(f"ptb-word-medium shapes, cuda_graphs={graphs}: peak allocated {mib[0]:,.0f} MiB, "
              f"peak reserved {mib[1]:,.0f} MiB", flush=True)
    return res


TARGETS = {"throughput": throughput, "ptb-small": ptb_small, "ptb-medium": ptb_medium, "profile": profile,
           "eval-tf32": eval_tf32, "graph-memory": graph_memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=list(TARGETS), help=", ".join(TARGETS))
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-gpu"))
    ap.add_argument("--seconds", type=float, default=15.0, help="throughput: training seconds per run")
    ap.add_argument("--medium-time", type=float, default=None,
                    help="ptb-medium: stop after this many training seconds (default: all 39 epochs)")
    ap.add_argument("--precision", default="fp32", help="ptb-small / ptb-medium: train.precision (default fp32)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only dry-runs the script itself")
    args = ap.parse_args()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (scripts/bench.py measures the CPU)")
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    print(f"# {date.today()} · {gpu} · torch {torch.__version__} (CUDA {torch.version.cuda})")
    results: dict = {"date": str(date.today()), "gpu": gpu, "torch": torch.__version__}
    for w in args.what:
        if w not in TARGETS:
            ap.error(f"unknown measurement {w!r}; choose from {', '.join(TARGETS)}")
        results[w] = TARGETS[w](args, out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        sys.stdout.flush()
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
