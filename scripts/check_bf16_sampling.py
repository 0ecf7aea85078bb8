"""How much `rnnlm sample --precision bf16` changes a trained model's next-token distributions, and
what it gains in speed: fp32 and bf16 samplers of the same checkpoint side by side.

1. Teacher-forced: both samplers' steppers are fed the same text (the first --tokens tokens of
   --data, after an <eos>) in lockstep; at every step the next-token log-probabilities of the two
   are compared: perplexity of the text under each, the largest |Δ log p| over all tokens and
   steps, the mean |Δ log p| of the tokens that came, and the mean KL(fp32 ‖ bf16).
2. Greedy: the two greedy continuations of the same prime, and how long they agree.
3. Speed: sampled generation at batch 1 (--length tokens, --repeats times, alternating).

usage: python scripts/check_bf16_sampling.py --checkpoint RUN_DIR --data FILE [--tokens 3000]
                                             [--prime TEXT] [--length 500] [--repeats 3]
prints: a short report and a JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from rnnlm.checkpoint import load_model
from rnnlm.sample import Sampler
from rnnlm.text import EOS, EOS_ID, UNK_ID


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a text file; its first --tokens tokens are fed")
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--prime", default="")
    p.add_argument("--greedy-length", type=int, default=200)
    p.add_argument("--length", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    lm = load_model(a.checkpoint, "cpu")
    with open(a.data, encoding="utf-8") as f:
        text = f.read(max(a.tokens * 40, 10_000))
    ids = lm.vocab.encode(lm.tokenizer.tokenize(text))[: a.tokens]
    if not ids:
        raise SystemExit(f"{a.data}: no tokens to feed")
    samplers = {prec: Sampler(lm.model, lm.vocab, lm.tokenizer, precision=prec) for prec in ("fp32", "bf16")}

    # 1. teacher-forced, in lockstep
    nll = {"fp32": 0.0, "bf16": 0.0}
    worst, diff_true, kl = 0.0, 0.0, 0.0
    with torch.inference_mode():
        steps = {prec: s._stepper(1) for prec, s in samplers.items()}
        for st in steps.values():
            st.start([EOS_ID], 1, mask_unk=False)
        for t, nxt in enumerate(ids):
            lp = {prec: torch.log_softmax(st.scores().double(), -1)[0] for prec, st in steps.items()}
            d = lp["bf16"] - lp["fp32"]
            worst = max(worst, float(d.abs().max()))
            diff_true += abs(float(d[nxt]))
            kl += float((lp["fp32"].exp() * -d).sum())
            for prec in nll:
                nll[prec] -= float(lp[prec][nxt])
            x = torch.tensor([nxt])
            for st in steps.values():
                st.advance(x)
    n = len(ids)
    report = {"checkpoint": a.checkpoint, "tokens": n, "unk_tokens": sum(i == UNK_ID for i in ids),
              "ppl_fp32": math.exp(nll["fp32"] / n), "ppl_bf16": math.exp(nll["bf16"] / n),
              "max_abs_dlogp": worst, "mean_abs_dlogp_true": diff_true / n, "mean_kl_fp32_bf16": kl / n}

    # 2. greedy continuations
    greedy = {prec: s.generate(a.prime, 1, a.greedy_length, greedy=True)[0].generated for prec, s in samplers.items()}
    g32, g16 = ([t for t in lm.tokenizer.tokenize(greedy[prec]) if t != EOS] for prec in ("fp32", "bf16"))
    agree = next((i for i, (u, v) in enumerate(zip(g32, g16)) if u != v), min(len(g32), len(g16)))
    report.update(greedy_tokens=len(g32), greedy_agree_prefix=agree)

    # 3. speed, alternating
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(a.repeats + 1):
        for prec, s in samplers.items():
            t0 = time.perf_counter()
            out = s.generate(a.prime, 1, a.length, temperature=1.0, seed=r)
            if r:  # the first round warms up
                rates[prec].append(out[0].tokens / (time.perf_counter() - t0))
    report.update({f"tok_s_{prec}": statistics.median(v) for prec, v in rates.items()})

    print(f"{n:,} tokens of {a.data}: perplexity fp32 {report['ppl_fp32']:.3f}, bf16 {report['ppl_bf16']:.3f}")
    print(f"largest |Δ log p| {worst:.4f}; mean |Δ log p| of the tokens that came {report['mean_abs_dlogp_true']:.5f}; "
          f"mean KL(fp32 ‖ bf16) {report['mean_kl_fp32_bf16']:.2e} nats")
    print(f"greedy: the first {agree} of {len(g32)} tokens agree")
    print(f"sampled, batch 1: fp32 {report['tok_s_fp32']:,.0f} tok/s, bf16 {report['tok_s_bf16']:,.0f} tok/s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
