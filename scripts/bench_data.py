#!/usr/bin/env python
"""Measure how fast rnnlm loads and encodes a corpus, and its peak memory, cold and warm.

Each measurement runs in a fresh child process, so peak RSS (VmHWM from /proc/self/status)
belongs to that run alone. "cold" starts from an empty cache folder; "warm" runs again on the
cache the cold run wrote. Corpora (char level, the default EOS policy):

  ptb-char   the PTB-char train.txt (10 MB), all of it used as training text
  synth-100  a generated ~100 MB pseudo-English text (deterministic; written to a temporary
             folder and reused, never committed), split 0.9/0.05/0.05 like any single file

    python scripts/bench_data.py                      # both corpora, 2 repeats
    python scripts/bench_data.py --corpus ptb-char --repeats 3
    python scripts/bench_data.py --json results.json

The timings: `import` (python + torch + rnnlm), `load` (rnnlm.data.load_corpus: hashing,
vocabulary, encoding or the cache check), `batch` (with_start + batchify, as the trainer does
before its first step); `total` is from process start to the first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RNNLM_SHARED_DATA") or ROOT.parent / "shared" / "data")


# -- the synthetic corpus -----------------------------------------------------------------

def synth_words(rng, n: int = 6000) -> list[str]:
    """Pseudo-English word types made of syllables, with a few accented ones."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "l", "m", "n", "p", "r", "s", "t", "v", "w", "th", "st",
              "ch", "sh", "pr", "tr", "gr", "cl"]
    nuclei = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "ee", "é", "ï"]
    codas = ["", "", "n", "r", "s", "t", "d", "l", "ng", "st", "ck"]
    words: set[str] = set()
    common = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "was", "for", "on", "as", "with", "he"]
    words.update(common)
    while len(words) < n:
        k = 1 + min(3, int(rng.expovariate(1.2)))
        words.add("".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(k)))
    return common + sorted(words - set(common))


def make_synthetic(path: Path, size_mb: int, seed: int = 0) -> Path:
    """Write ~size_mb MB of sentences (Zipf-distributed words, punctuation, paragraphs)."""
    import random

    import numpy as np

    target = size_mb * 1_000_000
    if path.is_file() and abs(path.stat().st_size - target) < 2_000_000:
        return path
    rng = random.Random(seed)
    vocab = np.array(synth_words(rng), dtype=object)
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    probs /= probs.sum()
    nrng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        while written < target:
            words = vocab[nrng.choice(len(vocab), size=200_000, p=probs)].tolist()
            ends = nrng.random(len(words))
            out = []
            start = True
            for w, e in zip(words, ends):
                out.append(w.capitalize() if start else w)
                start = False
                if e < 0.06:
                    out.append(", ")
                elif e < 0.12:
                    out.append(". " if e > 0.075 else ".\n" if e > 0.065 else ".\n\n")
                    start = True
                else:
                    out.append(" ")
            block = "".join(out)
            f.write(block)
            written += len(block.encode("utf-8"))
        f.write("\n")
    os.replace(tmp, path)
    return path


# -- one measurement (child process) ---------------------------------------------------------

def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    t0 = float(args.t0)
    __import__("torch")  # as the trainer would: its import time counts

    from rnnlm.config import build_config
    from rnnlm.data import batchify, load_corpus, with_start
    t_import = time.time()
    rss_import = vm_hwm_mb()
    overrides = [f"data.path={json.dumps(args.path)}", "data.level=char", f"data.cache_dir={json.dumps(args.cache)}"]
    if args.split:
        overrides.append(f"data.split={args.split}")
    cfg = build_config(overrides=overrides)
    corpus = load_corpus(cfg.data, cfg.resolved_eos())
    t_load = time.time()
    rss_load = vm_hwm_mb()
    data = batchify(with_start(corpus.train), 32)
    t_batch = time.time()
    print(json.dumps({
        "cached": corpus.cached, "tokens": int(sum(len(v) for v in corpus.splits.values())),
        "train_tokens": int(len(corpus.train)), "vocab": len(corpus.vocab), "batch_shape": list(data.shape),
        "import_s": t_import - t0, "load_s": t_load - t_import, "batch_s": t_batch - t_load,
        "total_s": t_batch - t0, "rss_import_mb": rss_import, "rss_load_mb": rss_load,
        "rss_peak_mb": vm_hwm_mb()}))


def run_child(path: Path, cache: Path, split: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--path", str(path), "--cache", str(cache), "--t0", repr(time.time())]
    if split:
        cmd += ["--split", split]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the driver --------------------------------------------------------------------------------

TARGETS = {"ptb-char": {"cold_s": 15, "cold_mb": 500, "warm_s": 3},
           "synth-100": {"cold_s": 90, "cold_mb": 1024, "warm_s": 3}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["ptb-char", "synth-100", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=2, help="cold + warm measurements per corpus")
    ap.add_argument("--size-mb", type=int, default=100, help="size of the synthetic corpus")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rnnlm-bench"),
                    help="where the synthetic corpus and the caches go (not the repository)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--split", help=argparse.SUPPRESS)
    ap.add_argument("--t0", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpora = []
    if args.corpus in ("ptb-char", "all"):
        p = SHARED / "ptb_char" / "train.txt"
        if p.is_file():
            corpora.append(("ptb-char", p, "[1.0,0.0,0.0]"))
        else:
            print(f"skipping ptb-char: {p} is absent (set RNNLM_SHARED_DATA)", file=sys.stderr)
    if args.corpus in ("synth-100", "all"):
        t = time.time()
        p = make_synthetic(work / f"synthetic-{args.size_mb}MB-seed0.txt", args.size_mb)
        print(f"synthetic corpus: {p} ({p.stat().st_size / 1e6:.1f} MB, ready in {time.time() - t:.1f} s)",
              file=sys.stderr)
        corpora.append(("synth-100", p, None))

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    print(f"# {time.strftime('%Y-%m-%d')} · {cpu} · {os.cpu_count()} cores · python {platform.python_version()} "
          f"· torch {torch.__version__}")
    print("| corpus | MB | run | tokens | load s | first batch s (total) | peak RSS after load MB | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name, path, split in corpora:
        mb = path.stat().st_size / 1e6
        for rep in range(args.repeats):
            cache = work / f"cache-{name}-{rep}"
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("cold", "warm"):
                r = run_child(path, cache, split)
                assert r["cached"] == (run == "warm"), r
                r.update(corpus=name, run=run, repeat=rep, mb=mb)
                results.append(r)
                print(f"| {name} | {mb:.1f} | {run} | {r['tokens']:,} | {r['load_s']:.2f} | {r['total_s']:.2f} | "
                      f"{r['rss_load_mb']:.0f} | {r['rss_peak_mb']:.0f} |", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    for name, tg in TARGETS.items():
        cold = [r for r in results if r["corpus"] == name and r["run"] == "cold"]
        warm = [r for r in results if r["corpus"] == name and r["run"] == "warm"]
        if cold:
            print(f"{name}: cold total {max(r['total_s'] for r in cold):.2f} s (target < {tg['cold_s']} s), "
                  f"peak RSS {max(r['rss_peak_mb'] for r in cold):.0f} MB (target < {tg['cold_mb']} MB); "
                  f"warm total {max(r['total_s'] for r in warm):.2f} s (target < {tg['warm_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
