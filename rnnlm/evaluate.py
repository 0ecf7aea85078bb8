"""Perplexity, bits per token and sentence scoring.

The definition (CONTRACT.md): the text is tokenized exactly like the training text; every
token, each ``<eos>`` included, is predicted exactly once; the first from the start state
(zero hidden state, previous token ``<eos>``); the hidden state is carried across the whole
file. ``loss`` = total NLL / predicted tokens (nats), ``ppl = exp(loss)``, bits per token =
``loss / ln 2``.

``batch_size > 1`` evaluates B contiguous pieces of the stream in parallel. Each piece
after the first starts from a zero state, so it is first *warmed up* on the ``burn_in``
tokens before it (fed, not scored): the conditioning differs from the exact carried-state
pass only beyond that horizon, which in practice changes the result by far less than
0.5 %. ``batch_size=1`` (the default of ``rnnlm eval-perplexity``) is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .data import TextSource, encode_source, encode_text
from .errors import UsageError
from .text import EOS, EOS_ID, UNK_ID, Tokenizer, Vocab


def _piece_layout(n: int, batch_size: int, burn_in: int) -> list[tuple[int, int, int]]:
    """Split targets 0..n-1 into contiguous pieces: (context_start, score_start, end) per piece."""
    b = max(1, min(batch_size, n))
    bounds = [round(i * n / b) for i in range(b + 1)]
    return [(max(0, a - burn_in), a, e) for a, e in zip(bounds, bounds[1:]) if e > a]


@torch.no_grad()
def stream_nll(model, ids: np.ndarray, batch_size: int = 1, window: int = 256, direction: int = 0,
               burn_in: int = 256, device: torch.device | str = "cpu",
               progress: Callable[[int], None] | None = None, autocast_dtype: torch.dtype | None = None) -> float:
    """Total negative log-likelihood (nats) of `ids`, each token predicted once from its left context.

    ids are in reading order of `direction` (reverse the text for the backward stack). The
    model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    n = len(ids)
    if n == 0:
        return 0.0
    stream = np.concatenate([[EOS_ID], np.asarray(ids, dtype=np.int64)])  # input k predicts target k
    pieces = _piece_layout(n, batch_size, burn_in)
    B = len(pieces)
    T = max(e - c for c, _, e in pieces)
    x = np.full((T, B), EOS_ID, dtype=np.int64)
    y = np.zeros((T, B), dtype=np.int64)
    w = np.zeros((T, B), dtype=np.float32)  # 1 where a target is scored
    for j, (c, s, e) in enumerate(pieces):
        L = e - c
        x[:L, j] = stream[c:e]
        y[:L, j] = stream[c + 1:e + 1]
        w[s - c:L, j] = 1.0
    xt, yt, wt = (torch.from_numpy(a).to(device) for a in (x, y, w))
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    dev_type = device.type
    for t0 in range(0, T, window):
        xs, ys, ws = xt[t0:t0 + window], yt[t0:t0 + window], wt[t0:t0 + window]
        with torch.autocast(dev_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            h, state = model(xs, state, direction)
        nll = model.nll(h.float(), ys, reduction="none").view_as(ws)
        total += (nll.double() * ws).sum()
        if progress is not None:
            progress(int(ws.sum().item()))
    if was_training:
        model.train()
    return float(total.item())


@dataclass
class TextStats:
    tokens: int
    oov: int
    words: int


def evaluate_ids(model, ids: np.ndarray, batch_size: int = 1, device="cpu", window: int = 256,
                 progress=None, autocast_dtype=None) -> dict:
    """Loss and perplexity of an id stream for each direction of the model."""
    n = len(ids)
    out: dict = {}
    fwd = stream_nll(model, ids, batch_size, window, 0, device=device, progress=progress,
                     autocast_dtype=autocast_dtype) / n
    out["loss"] = fwd
    if getattr(model, "num_directions", 1) == 2:
        bwd = stream_nll(model, np.ascontiguousarray(ids[::-1]), batch_size, window, 1, device=device,
                         progress=progress, autocast_dtype=autocast_dtype) / n
        out.update(forward_loss=fwd, backward_loss=bwd, forward_ppl=_exp(fwd), backward_ppl=_exp(bwd))
        out["loss"] = (fwd + bwd) / 2  # geometric mean of the two perplexities
    out["ppl"] = _exp(out["loss"])
    out["bits_per_token"] = out["loss"] / math.log(2)
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def count_words(tokenizer: Tokenizer, text_units: int, text: str) -> int:
    return len(text.split()) + text_units


def perplexity(model, vocab: Vocab, tokenizer: Tokenizer, path: str | Path, batch_size: int = 1,
               device="cpu", encoding: str = "utf-8", errors: str = "strict", progress=None) -> dict:
    """Evaluate a text file as CONTRACT.md defines; returns the JSON-ready result."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"evaluation file not found: {p}")
    ids = encode_source(TextSource(p), tokenizer, vocab, encoding, errors)
    if len(ids) == 0:
        raise UsageError(f"evaluation file {p} has no tokens")
    res = evaluate_ids(model, ids, batch_size, device, progress=progress)
    oov = int(np.count_nonzero(ids == UNK_ID))
    result = {"tokens": int(len(ids)), "oov": oov, "oov_rate": oov / len(ids), **res,
              "batch_size": batch_size, "level": tokenizer.level, "file": str(p)}
    if tokenizer.level == "char":
        result["bpc"] = result["bits_per_token"]
        # Words (+ EOS) of the same text, so char and word models can be compared:
        # word-level ppl = exp(total NLL / number of words).
        n_words = int(np.count_nonzero(ids == EOS_ID))
        n_words += _count_words(p, tokenizer, encoding, errors)
        result["words"] = n_words
        result["word_ppl"] = _exp(result["loss"] * len(ids) / max(1, n_words))
    return result


def _count_words(p: Path, tokenizer: Tokenizer, encoding: str, errors: str) -> int:
    from .data import read_lines
    from .text import iter_chunks
    n = 0
    for chunk in iter_chunks(read_lines(TextSource(p), encoding, errors), tokenizer):
        n += len(tokenizer.clean(chunk).split())
    return n


@torch.no_grad()
def score_sentences(model, vocab: Vocab, tokenizer: Tokenizer, sentences: Iterable[str], device="cpu",
                    batch_size: int = 64) -> list[dict]:
    """Score each sentence independently: fresh state, previous token <eos>, EOS appended.

    Returns, per sentence, the natural-log probability of its tokens and its EOS, the token
    count (EOS included) and the perplexity exp(-logprob / tokens). Uses the forward direction.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sents = list(sentences)
    encoded = []
    for s in sents:
        text = tokenizer.clean(s)
        toks = list(text) if tokenizer.level == "char" else tokenizer.split_words(text)
        encoded.append(vocab.encode(toks) + [EOS_ID])
    results: list[dict | None] = [None] * len(sents)
    order = sorted(range(len(sents)), key=lambda i: len(encoded[i]))
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        T = max(len(encoded[i]) for i in idx)
        x = torch.full((T, len(idx)), EOS_ID, dtype=torch.long)
        y = torch.zeros((T, len(idx)), dtype=torch.long)
        m = torch.zeros((T, len(idx)))
        for j, i in enumerate(idx):
            seq = [EOS_ID] + encoded[i]
            L = len(encoded[i])
            x[:L, j] = torch.tensor(seq[:-1])
            y[:L, j] = torch.tensor(seq[1:])
            m[:L, j] = 1
        h, _ = model(x.to(device), None, 0)
        nll = model.nll(h.float(), y.to(device), reduction="none").view(T, len(idx)).cpu() * m
        for j, i in enumerate(idx):
            lp = -float(nll[:, j].double().sum())
            n = len(encoded[i])
            results[i] = {"text": sents[i], "tokens": n, "logprob": lp, "ppl": _exp(-lp / n),
                          "oov": sum(1 for t in encoded[i] if t == UNK_ID)}
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def text_ids(text: str, tokenizer: Tokenizer, vocab: Vocab) -> np.ndarray:
    return encode_text(text, tokenizer, vocab)


__all__ = ["perplexity", "evaluate_ids", "stream_nll", "score_sentences", "EOS"]
