#!/usr/bin/env python3
"""Speed and time-to-quality benchmarks against the plain-PyTorch reference, in one run.

Every figure is a ratio against ``shared/bench/ref_loop.py`` measured in the same
invocation (machines are shared; absolute speeds drift). Each measurement runs in its own
subprocess, one after another, never in parallel.

    python scripts/bench.py --short            # < 2 minutes: throughput ratios on PTB
    python scripts/bench.py --short --repeats 3   # the same three times: median and range of the ratios
    python scripts/bench.py throughput         # target 1 with more steps
    python scripts/bench.py ptb-fast           # target 2: time to valid ppl <= 120
    python scripts/bench.py wikitext2          # target 3: adaptive softmax vs reference
    python scripts/bench.py shakespeare        # target 4: val loss <= 1.47 within 80 s
    python scripts/bench.py ptb-small          # target 5: Zaremba small, full 13 epochs (long)
    python scripts/bench.py generation         # target 6: tokens/s at batch 1, 2x512 LSTM (fp32 and bf16)

Options: --ref PATH (ref_loop.py), --data DIR (folder with ptb/, wikitext-2/, tinyshakespeare/),
--out DIR (run directories and a results JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def ratio_summary(reps: list[dict]) -> dict:
    """Median and range of the per-repeat ratios (each against the reference runs around it)."""
    out = {}
    for k in ("ratio_fp32", "ratio_bf16"):
        vals = sorted(r[k] for r in reps)
        out[f"{k}_median"] = statistics.median(vals)
        out[f"{k}_min"], out[f"{k}_max"] = vals[0], vals[-1]
    return out


def host_speed(reps: int = 15) -> dict:
    """What the shared host gives right now, for reading a ratio: GFLOP/s of the two products that
    dominate the two sides, the decoder's in bf16 (rnnlm bf16: 700x208 . 208x10,000) and the
    reference's in fp32 (PyTorch's default CPU matmul: 700x200 . 200x10,000), medians of `reps`."""
    import torch
    out = {}
    for name, dtype, k in (("bf16", torch.bfloat16, 208), ("fp32", torch.float32, 200)):
        a, b = torch.randn(700, k).to(dtype), torch.randn(k, 10_000).to(dtype)
        times = []
        for _ in range(reps + 3):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        out[f"host_{name}_gflops"] = 2 * 700 * k * 10_000 / statistics.median(times[3:]) / 1e9
    return out


def throughput(args, out: Path, steps: int) -> dict:
    """Target 1. Each repeat runs reference fp32, rnnlm fp32, rnnlm bf16, reference fp32 again, and
    takes its ratios against the mean of its own two reference runs; with --repeats N the median and
    the range over the repeats are printed as well (the shared machine drifts by +-15 %)."""
    ptb = find_data("ptb", args.data)
    warm = 10
    reps = []
    ref_bf16 = None
    for rep in range(args.repeats):
        res = host_speed()
        res["ref_fp32"] = run_ref(args.ref, ptb / "train.txt", steps)["tokens_per_sec"]
        for prec in ("fp32", "bf16"):
            r = run_rnnlm(out / f"tp-{prec}-{rep}", ptb, IDENTICAL + [
                f"train.precision={prec}", f"train.max_steps={warm + steps}", f"train.log_every={warm}",
                "train.eval_max_tokens=2000"])
            res[f"rnnlm_{prec}"] = steady_tokens_per_sec(r["events"])
        if ref_bf16 is None:  # the reference's own bf16 mode, for comparison: once is enough
            ref_bf16 = run_ref(args.ref, ptb / "train.txt", steps, bf16=True)["tokens_per_sec"]
        res["ref_bf16"] = ref_bf16
        res["ref_fp32_again"] = run_ref(args.ref, ptb / "train.txt", steps)["tokens_per_sec"]
        ref = (res["ref_fp32"] + res["ref_fp32_again"]) / 2
        res["ratio_fp32"] = res["rnnlm_fp32"] / ref
        res["ratio_bf16"] = res["rnnlm_bf16"] / ref
        reps.append(res)
        tag = f" (repeat {rep + 1}/{args.repeats})" if args.repeats > 1 else ""
        print(f"throughput, PTB 2x200 LSTM, {steps} steps after {warm} warm-up{tag}:")
        print(f"  reference fp32   {res['ref_fp32']:>9,.0f} tok/s  (again: {res['ref_fp32_again']:,.0f})")
        print(f"  reference bf16   {res['ref_bf16']:>9,.0f} tok/s")
        print(f"  rnnlm fp32       {res['rnnlm_fp32']:>9,.0f} tok/s  = {res['ratio_fp32']:.2f}x reference fp32")
        print(f"  rnnlm bf16       {res['rnnlm_bf16']:>9,.0f} tok/s  = {res['ratio_bf16']:.2f}x reference fp32")
        print(f"  (the host before this repeat: bf16 matmul {res['host_bf16_gflops']:,.0f} GFLOP/s, "
              f"fp32 matmul {res['host_fp32_gflops']:,.0f} GFLOP/s)")
        sys.stdout.flush()
    if len(reps) == 1:
        return reps[0]
    summary = ratio_summary(reps)
    print(f"over {len(reps)} repeats: fp32 median {summary['ratio_fp32_median']:.2f}x "
          f"({summary['ratio_fp32_min']:.2f}-{summary['ratio_fp32_max']:.2f}), bf16 median "
          f"{summary['ratio_bf16_median']:.2f}x ({summary['ratio_bf16_min']:.2f}-{summary['ratio_bf16_max']:.2f})")
    return {"repeats": reps, **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=[],
                    help="throughput ptb-fast wikitext2 shakespeare ptb-small generation")
    ap.add_argument("--short", action="store_true", help="the < 2 minute day-to-day check")
    ap.add_argument("--repeats", type=int, default=1,
                    help="throughput: repeat the measurement N times and report the median ratio (default 1)")
    ap.add_argument("--ref", type=Path, default=DEFAULT_REF)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--ref-cap", type=float, default=1500.0,
                    help="ptb-fast: stop the reference after this many training seconds (default 1500)")
    ap.add_argument("--wt2-time", type=float, default=300.0,
                    help="wikitext2: the equal wall time for the quality comparison (default 300 s)")
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
        (out / "results.json").write_text(json.dumps(results, indent=1))  # after each, so a failure keeps the rest
        sys.stdout.flush()
    print(f"results: {out / 'results.json'}")


def run_ref_train(train_txt: Path, valid_txt: Path, extra: list[str]) -> dict:
    """scripts/ref_train.py (the reference recipe with validation): its eval events and end line."""
    cmd = [sys.executable, str(ROOT / "scripts" / "ref_train.py"), str(train_txt), str(valid_txt)] + extra
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.strip().splitlines() if x.startswith("{")]
    return {"evals": [x for x in lines if x["event"] == "eval"], "end": lines[-1]}


def first_valid_at_most(events: list[dict], ppl: float) -> dict | None:
    for e in events:
        if e["event"] == "eval" and e.get("split", "valid") == "valid" and e["ppl"] <= ppl:
            return e
    return None


def ptb_fast(args, out: Path) -> dict:
    """Target 2: wall time to valid ppl <= 120, configs/ptb-word-fast.yaml against the reference
    recipe (scripts/ref_train.py, validated 4 times per epoch, evaluation time not counted)."""
    ptb = find_data("ptb", args.data)
    target = 120.0
    res: dict = {"target_ppl": target}
    res["ref_loop_tok_s"] = run_ref(args.ref, ptb / "train.txt", 60)["tokens_per_sec"]
    r = run_rnnlm(out / "ptb-fast", ptb, [], config=str(ROOT / "configs" / "ptb-word-fast.yaml"))
    startup = r["wall"] - r["end"]["time"]       # process start, data, model, final save: charged to rnnlm
    hit = first_valid_at_most(r["events"], target)
    res["rnnlm_wall"] = r["wall"]
    res["rnnlm_seconds_to_target"] = hit["time"] + startup if hit else None
    res["rnnlm_valid_ppl"] = [round(e["ppl"], 2) for e in r["events"] if e["event"] == "eval"]
    cap = args.ref_cap
    with open(ptb / "train.txt", encoding="utf-8") as f:   # words + one <eos> per line, as ref_train.py counts
        train_tokens = sum(len(line.split()) + 1 for line in f)
    steps_per_epoch = train_tokens // (20 * 35)              # batch x bptt: 4 validations per epoch
    ref = run_ref_train(ptb / "train.txt", ptb / "valid.txt", ["--target-ppl", str(target), "--max-time", str(cap),
                                                               "--eval-every", str(steps_per_epoch // 4)])
    hit_ref = next((e for e in ref["evals"] if e["valid_ppl"] <= target), None)
    res["ref_tok_s"] = ref["end"]["tokens_per_sec"]
    res["ref_seconds_to_target"] = hit_ref["train_seconds"] if hit_ref else None
    res["ref_valid_ppl"] = [(e["train_seconds"], round(e["valid_ppl"], 2)) for e in ref["evals"]]
    print(f"PTB valid ppl <= {target:g}:")
    print(f"  reference recipe: {res['ref_tok_s']:,.0f} tok/s (ref_loop.py in this run: {res['ref_loop_tok_s']:,.0f}); "
          + (f"reached in {res['ref_seconds_to_target']:,.0f} s of training" if hit_ref else
             f"not reached in {cap:,.0f} s of training (best {ref['end']['best_valid_ppl']:.1f})"))
    if hit:
        print(f"  rnnlm ptb-word-fast.yaml: reached in {res['rnnlm_seconds_to_target']:,.0f} s wall "
              f"(start-up and validations included; valid ppl {hit['ppl']:.2f} at step {hit['step']})")
    else:
        print(f"  rnnlm ptb-word-fast.yaml: not reached (valid ppl {res['rnnlm_valid_ppl']})")
    if hit:
        ref_t = res["ref_seconds_to_target"] or cap
        res["ratio"] = res["rnnlm_seconds_to_target"] / ref_t
        print(f"  rnnlm / reference time = {res['ratio']:.2f}" + ("" if hit_ref else " (at most: the reference did not get there)")
              + "   (target <= 0.33)")
    return res


def wikitext2(args, out: Path) -> dict:
    """Target 3: WikiText-2 throughput on the reference's shapes (adaptive softmax, bf16) against the
    reference fp32, then validation perplexity after equal wall time."""
    wt = find_data("wikitext-2", args.data)
    res: dict = {}
    steps, warm = 30, 10
    res["ref_fp32_tok_s"] = run_ref(args.ref, wt / "train.txt", steps)["tokens_per_sec"]
    shapes = IDENTICAL + ["model.softmax=adaptive", "train.precision=bf16", f"train.max_steps={warm + 3 * steps}",
                          f"train.log_every={warm}", "train.eval_max_tokens=2000"]
    r = run_rnnlm(out / "wt2-tp", wt, shapes)
    res["rnnlm_adaptive_bf16_tok_s"] = steady_tokens_per_sec(r["events"])
    res["ratio"] = res["rnnlm_adaptive_bf16_tok_s"] / res["ref_fp32_tok_s"]
    print("WikiText-2, 2x200 LSTM, bptt 35, batch 20 (33,278 words):")
    print(f"  reference fp32 (full softmax)   {res['ref_fp32_tok_s']:>9,.0f} tok/s")
    print(f"  rnnlm adaptive softmax, bf16    {res['rnnlm_adaptive_bf16_tok_s']:>9,.0f} tok/s = {res['ratio']:.1f}x   (target >= 5)")
    T = args.wt2_time
    ref = run_ref_train(wt / "train.txt", wt / "valid.txt", ["--max-time", str(T)])
    res["ref_valid_ppl_at_T"] = ref["evals"][-1]["valid_ppl"]
    res["ref_train_seconds"] = ref["end"]["train_seconds"]
    r = run_rnnlm(out / "wt2-quality", wt, [f"train.max_time={T}", "train.epochs=100", "train.precision=bf16"],
                  config=str(ROOT / "configs" / "wikitext2-word.yaml"))
    ev = [e for e in r["events"] if e["event"] == "eval" and e.get("split", "valid") == "valid"]
    res["rnnlm_valid_ppl_at_T"] = ev[-1]["ppl"]
    res["rnnlm_wall"] = r["wall"]
    print(f"  after {T:g} s: reference valid ppl {res['ref_valid_ppl_at_T']:.1f} ({res['ref_train_seconds']:.0f} s of "
          f"training, evaluation not counted); rnnlm wikitext2-word.yaml {res['rnnlm_valid_ppl_at_T']:.1f} "
          f"({r['wall']:.0f} s wall, start-up and evaluation included)")
    return res


def shakespeare(args, out: Path) -> dict:
    """Target 4: configs/shakespeare-char.yaml, final valid loss (nats/char) and the command's wall time."""
    txt = find_data("tinyshakespeare", args.data) / "input.txt"
    r = run_rnnlm(out / "shakespeare", txt, [], config=str(ROOT / "configs" / "shakespeare-char.yaml"))
    ev = [e for e in r["events"] if e["event"] == "eval" and e.get("split", "valid") == "valid"]
    res = {"valid_loss": ev[-1]["loss"], "wall": r["wall"], "steps": r["end"]["step"],
           "tokens_per_sec": r["end"]["train_tokens_per_sec"]}
    print(f"Tiny Shakespeare (char, nanoGPT's 90/10 split): valid loss {res['valid_loss']:.4f} nats/char after "
          f"{res['steps']} steps ({res['tokens_per_sec']:,.0f} tok/s), {res['wall']:.1f} s wall   "
          f"(target <= 1.47 within 80 s)")
    return res


def ptb_small(args, out: Path) -> dict:
    """Target 5: configs/ptb-word-small.yaml (Zaremba et al. small) in bf16, then test perplexity."""
    ptb = find_data("ptb", args.data)
    r = run_rnnlm(out / "ptb-small", ptb, ["train.precision=bf16"], config=str(ROOT / "configs" / "ptb-word-small.yaml"))
    cmd = [sys.executable, "-m", "rnnlm", "eval-perplexity", "--checkpoint", str(out / "ptb-small"),
           "--data", str(ptb / "test.txt"), "--json", "--batch-size", "16"]
    test = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    res = {"test_ppl": test["ppl"], "best_valid_ppl": r["end"]["best_valid_ppl"], "wall": r["wall"]}
    print(f"PTB small (Zaremba et al. 2014): test ppl {res['test_ppl']:.2f}, best valid {res['best_valid_ppl']:.2f}, "
          f"{res['wall']:.0f} s wall   (target test <= 114.5)")
    return res


def generation(args, out: Path) -> dict:
    """Target 6: scripts/bench_generate.py at batch 1, 2x512 LSTM, 100-token vocabulary, the default
    fp32 sampler and `--precision bf16` timed alternately."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--vocab", "100", "--length", "2000",
           "--repeats", "3", "--precision", "fp32", "bf16"]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    res = json.loads(lines[-1])
    for line in lines[1:-1]:
        print(f"  {line}")
    return res


TARGETS: dict = {"ptb-fast": ptb_fast, "wikitext2": wikitext2, "shakespeare": shakespeare, "ptb-small": ptb_small,
                 "generation": generation}

if __name__ == "__main__":
    main()
