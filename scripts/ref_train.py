#!/usr/bin/env python3
"""The reference recipe trained for quality: ``shared/bench/ref_loop.py``'s model and step, plus
what its parent (the PyTorch word_language_model example) does around them -- validation
perplexity, and the learning rate divided by 4 whenever validation does not improve.

ref_loop.py measures speed only. The time-to-quality targets need the reference's *validation
perplexity over time*, so this script repeats its recipe unchanged -- same vocabulary (built from
the training file, ``<eos>`` per line), same (T, B) batching, embedding -> dropout -> ``nn.LSTM`` ->
dropout -> linear, ``nn.CrossEntropyLoss``, ``clip_grad_norm_``, the hand-written SGD update, the
state detached each window (and reset to zero at each epoch, as in the example; ref_loop.py wraps
around with it) -- and evaluates the validation file every ``--eval-every`` steps
(default: once per pass over the data, as the example does), batch 10, state carried, dropout
off. ``scripts/bench.py`` runs ref_loop.py in the same invocation so the two speeds can be compared.

Only training time is counted (``train_seconds``): evaluation is excluded, which favours the
reference. Stops at --target-ppl, --max-time (training seconds) or --epochs.

``--device cuda`` runs the same recipe on a GPU (the example's ``--cuda``): ref_loop.py is CPU-only,
and ``scripts/bench_gpu.py`` measures against this instead. Training seconds are then read after
the GPU has finished its queued work.

usage: ref_train.py TRAIN_TXT VALID_TXT [--target-ppl P] [--max-time S] [--epochs N]
                    [--eval-every STEPS] [model/optimizer options as ref_loop.py] [--bf16] [--device D]
prints: one JSON line per evaluation, then a summary line {"event": "end", ...}
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn as nn


def read_ids(path: str, vocab: dict[str, int], grow: bool) -> torch.Tensor:
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for w in line.split() + ["<eos>"]:
                if grow:
                    ids.append(vocab.setdefault(w, len(vocab)))
                else:
                    ids.append(vocab.get(w, vocab.get("<unk>", 0)))
    return torch.tensor(ids)


def columns(data: torch.Tensor, batch: int) -> torch.Tensor:
    n = data.numel() // batch
    return data[: n * batch].view(batch, n).t().contiguous()  # (T, B)


class LM(nn.Module):
    def __init__(self, V: int, a):
        super().__init__()
        self.V = V
        self.drop = nn.Dropout(a.dropout)
        self.emb = nn.Embedding(V, a.emsize)
        self.rnn = nn.LSTM(a.emsize, a.nhid, a.nlayers, dropout=a.dropout)
        self.dec = nn.Linear(a.nhid, V)

    def forward(self, x, h):
        o, h = self.rnn(self.drop(self.emb(x)), h)
        return self.dec(self.drop(o)).view(-1, self.V), h


def evaluate(m: LM, data: torch.Tensor, a, bf16: bool) -> float:
    """Mean NLL per token over the whole (T, B) array, state carried, windows of a.bptt."""
    m.eval()
    total, count = 0.0, 0
    h = tuple(torch.zeros(a.nlayers, data.size(1), a.nhid, device=data.device) for _ in range(2))
    with torch.no_grad():
        for pos in range(0, data.size(0) - 1, a.bptt):
            n = min(a.bptt, data.size(0) - 1 - pos)
            x, y = data[pos: pos + n], data[pos + 1: pos + 1 + n].reshape(-1)
            with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=bf16):
                out, h = m(x, h)
            total += nn.functional.cross_entropy(out.float(), y, reduction="sum").item()
            count += y.numel()
    m.train()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train")
    p.add_argument("valid")
    p.add_argument("--target-ppl", type=float, default=None)
    p.add_argument("--max-time", type=float, default=None, help="training seconds (evaluation not counted)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0 = once per epoch)")
    p.add_argument("--eval-batch", type=int, default=10)
    p.add_argument("--emsize", type=int, default=200)
    p.add_argument("--nhid", type=int, default=200)
    p.add_argument("--nlayers", type=int, default=2)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a = p.parse_args()
    torch.manual_seed(1111)
    dev = torch.device(a.device)

    def sync() -> None:  # the host clock is read only after the GPU's queued work is done
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    vocab: dict[str, int] = {}
    data = columns(read_ids(a.train, vocab, grow=True), a.batch).to(dev)
    valid = columns(read_ids(a.valid, vocab, grow=False), a.eval_batch).to(dev)
    V = len(vocab)
    m = LM(V, a).to(dev)
    crit = nn.CrossEntropyLoss()
    steps_per_epoch = (data.size(0) - 2) // a.bptt
    eval_every = a.eval_every or steps_per_epoch
    lr, best, best_any = a.lr, math.inf, math.inf
    train_seconds, step, tokens, epoch = 0.0, 0, 0, 0
    reason = "epochs"
    wall0 = time.perf_counter()
    while epoch < a.epochs and reason == "epochs":
        h = tuple(torch.zeros(a.nlayers, a.batch, a.nhid, device=dev) for _ in range(2))
        sync()
        t0 = time.perf_counter()
        for pos in range(0, steps_per_epoch * a.bptt, a.bptt):
            x, y = data[pos: pos + a.bptt], data[pos + 1: pos + 1 + a.bptt].reshape(-1)
            h = tuple(t.detach() for t in h)
            m.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                out, h = m(x, h)
                loss = crit(out.float(), y)
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), a.clip)
            with torch.no_grad():
                for p_ in m.parameters():
                    p_.add_(p_.grad, alpha=-lr)
            step += 1
            tokens += y.numel()
            last_of_epoch = pos + a.bptt >= steps_per_epoch * a.bptt
            over_time = a.max_time is not None and train_seconds + time.perf_counter() - t0 >= a.max_time
            if step % eval_every == 0 or last_of_epoch or over_time:
                sync()
                train_seconds += time.perf_counter() - t0
                vloss = evaluate(m, valid, a, a.bf16)
                ppl = math.exp(vloss)
                best_any = min(best_any, vloss)
                print(json.dumps({"event": "eval", "step": step, "epoch": round(step / steps_per_epoch, 3),
                                  "tokens": tokens, "train_seconds": round(train_seconds, 2),
                                  "wall": round(time.perf_counter() - wall0, 2), "valid_ppl": ppl, "lr": lr}),
                      flush=True)
                if last_of_epoch:            # the example anneals once per epoch
                    if vloss < best:
                        best = vloss
                    else:
                        lr /= 4.0
                if a.target_ppl is not None and ppl <= a.target_ppl:
                    reason = "target"
                elif over_time:
                    reason = "max_time"
                if reason != "epochs":
                    break
                sync()
                t0 = time.perf_counter()
        epoch += 1
    print(json.dumps({"event": "end", "reason": reason, "step": step, "tokens": tokens,
                      "train_seconds": round(train_seconds, 2), "tokens_per_sec": tokens / max(train_seconds, 1e-9),
                      "best_valid_ppl": math.exp(best_any) if best_any < math.inf else None, "vocab": V}), flush=True)


if __name__ == "__main__":
    main()
