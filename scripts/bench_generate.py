"""Generation speed: tokens/s of `Sampler.generate` at batch 1 (and optionally larger batches).

Builds randomly initialised 2-layer LSTMs (or another --cell; weights do not matter for speed; the <eos> logit
is pushed down so every sample runs to --length tokens) for a character-sized and a
word-sized vocabulary, and times greedy and sampled generation. With --baseline it also
times the plain loop a user would write (`model(x, state)` + `log_probs` + multinomial per
token, i.e. `nn.LSTM` called one step at a time), in the same process.

usage: python scripts/bench_generate.py [--cell lstm] [--softmax full] [--hidden 512] [--layers 2] [--vocab 100 10000]
                                         [--batch 1 [16 ...]] [--length 2000] [--repeats 5] [--threads N]
                                         [--precision fp32 [bf16]] [--baseline]
prints: one line per configuration (median and best of the repeats, and tokens per CPU-second of
        the process: with --threads 1, what an otherwise idle core gives) and a JSON summary
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from rnnlm.config import ModelConfig
from rnnlm.models import RNNLM
from rnnlm.sample import Sampler
from rnnlm.text import EOS_ID, Tokenizer, Vocab


def build(vocab_size: int, hidden: int, layers: int, embedding: int, seed: int = 0, cell: str = "lstm",
          softmax: str = "full"):
    torch.manual_seed(seed)
    model = RNNLM(vocab_size, ModelConfig(cell=cell, hidden_size=hidden, embedding_size=embedding,
                                          num_layers=layers, softmax=softmax)).eval()
    with torch.no_grad():  # never end early: every sample is --length tokens
        if model.adaptive:  # (the adaptive head has no bias of its own: give it one)
            old = model.softmax.head
            head = torch.nn.Linear(old.in_features, old.out_features)
            head.weight.copy_(old.weight)
            head.bias.zero_()
            head.bias[EOS_ID] = -1e4
            model.softmax.head = head
        else:
            model.decoder.bias[EOS_ID] = -1e4
    vocab = Vocab(["<unk>", "<eos>"] + [f"t{i}" for i in range(vocab_size - 2)])
    level = "char" if vocab_size <= 1000 else "word"
    return model, vocab, Tokenizer(level=level, eos="line")


def time_generate(sampler: Sampler, length: int, repeats: int, batch: int, **kw) -> tuple[list[float], list[float]]:
    """(tokens per wall-clock second, tokens per CPU second of this process) for each repeat.

    On a machine shared with other jobs the wall-clock rate depends on what else runs; the CPU
    rate (with --threads 1) is what one idle core would give, less cache and memory contention.
    """
    sampler.generate("", batch, min(length, 50), seed=0, **kw)  # warm-up
    wall, cpu = [], []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = sampler.generate("", batch, length, seed=r, **kw)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        n = sum(s.tokens for s in out)
        wall.append(n / dt)
        cpu.append(n / max(dc, 1e-9))
    return wall, cpu


def time_baseline(model, length: int, repeats: int) -> list[float]:
    """The straightforward loop: the model's forward for one step, full log-softmax, multinomial."""
    rates = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            x = torch.full((1, 1), EOS_ID, dtype=torch.long)
            state = None
            for _ in range(length):
                h, state = model(x, state, 0)
                lp = model.log_probs(h[-1])
                lp[:, 0] = float("-inf")
                x = torch.multinomial(lp.exp(), 1, generator=gen).view(1, 1)
            rates.append(length / (time.perf_counter() - t0))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm", choices=["lstm", "lstm_peephole", "gru", "rnn_tanh", "rnn_relu"])
    p.add_argument("--softmax", default="full", choices=["full", "adaptive"],
                   help="output layer (adaptive: the model's default cutoffs for each --vocab)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embedding", type=int, default=512)
    p.add_argument("--vocab", type=int, nargs="+", default=[100, 10000])
    p.add_argument("--length", type=int, default=2000, help="tokens per timed sample")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="the sampler's precision(s), timed alternately (bf16: large products in bfloat16)")
    p.add_argument("--baseline", action="store_true", help="also time the naive per-token model() loop")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = {"greedy": dict(greedy=True), "sampled": dict(temperature=1.0),
             "top-k 40 + top-p 0.9": dict(temperature=0.8, top_k=40, top_p=0.9)}
    results = []
    print(f"torch {torch.__version__} · {platform.processor() or platform.machine()} · "
          f"threads {torch.get_num_threads()} · {a.layers}x{a.hidden} {a.cell}, embedding {a.embedding}, {a.softmax} softmax")
    for V in a.vocab:
        model, vocab, tok = build(V, a.hidden, a.layers, a.embedding, cell=a.cell, softmax=a.softmax)
        samplers = {prec: Sampler(model, vocab, tok, precision=prec) for prec in a.precision}
        for batch in a.batch:
            for name, kw in modes.items():
                for prec, sampler in samplers.items():  # precisions side by side, in the same minute
                    rates, cpu = time_generate(sampler, a.length, a.repeats, batch, **kw)
                    row = {"vocab": V, "batch": batch, "mode": name, "precision": prec,
                           "median_tok_s": statistics.median(rates), "best_tok_s": max(rates),
                           "median_tok_per_cpu_s": statistics.median(cpu), "runs": [round(r) for r in rates]}
                    results.append(row)
                    print(f"vocab {V:>6}  batch {batch:>3}  {prec}  {name:<22} median {row['median_tok_s']:>9,.0f} "
                          f"tok/s   best {row['best_tok_s']:>9,.0f} tok/s   per CPU-second "
                          f"{row['median_tok_per_cpu_s']:>9,.0f}", flush=True)
        if a.baseline:
            n = max(20, min(a.length, 300))
            rates = time_baseline(model, n, min(a.repeats, 3))
            row = {"vocab": V, "batch": 1, "mode": "baseline model() loop", "median_tok_s": statistics.median(rates),
                   "best_tok_s": max(rates), "runs": [round(r) for r in rates]}
            results.append(row)
            print(f"vocab {V:>6}  batch   1  {'baseline model() loop':<22} median {row['median_tok_s']:>9,.0f} "
                  f"tok/s   best {row['best_tok_s']:>9,.0f} tok/s", flush=True)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "cell": a.cell,
                      "softmax": a.softmax, "hidden": a.hidden,
                      "layers": a.layers, "embedding": a.embedding, "length": a.length, "results": results}))


if __name__ == "__main__":
    main()
