"""Perplexity, bits per token and sentence scoring.

The definition (CONTRACT.md): the text is tokenized exactly like the training text; every
token, each ``<eos>`` included, is predicted exactly once; the first from the start state
(zero hidden state, previous token ``<eos>``); the hidden state is carried across the whole
file. ``loss`` = total NLL / predicted tokens (nats), ``ppl = exp(loss)``, bits per token =
``loss / ln 2`` (``bpc`` at char level).

Batching without changing the number. ``batch_size = B > 1`` cuts the stream into B
contiguous pieces and runs them side by side. A piece that does not start at the beginning
of the file starts from a zero state, so it is first *warmed up* on the ``burn_in`` tokens
before it (fed, not scored). The warmed-up state is then checked against the exact one -- the
state the previous piece ends in, itself exact by induction -- and where they differ by more
than a float tolerance (a few units of rounding of the arithmetic used: `state_tolerance`), the
piece is re-run from the exact state, window by window, until its state meets the parallel run's
(from there on both runs are the same computation). So every batch size gives the batch-1 number
up to float rounding; batching is only faster, the more so the shorter the model's memory (a
model whose state never forgets pays one extra sequential pass at worst). One allowance keeps trained LSTMs from paying that: memory cells
that sit deep in saturation on the same side in both states count as equal (see `_close`).
``exact=False`` skips the check (the warm-up alone, accurate to about 1e-6 on trained models,
but several percent off for a model that remembers further back than ``burn_in``).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch

from .cache import CacheSpec, cache_nll, feature_store
from .data import TextSource, check_readable, encode_source, encode_text
from .dynamic import DynamicSpec, RMSStatistics, dynamic_nll, gradient_rms, stats_layout
from .errors import UsageError
from .ops import no_autocast, to_float64
from .text import EOS_ID, UNK, UNK_ID, Tokenizer, Vocab

# eval-perplexity shows a progress bar (on a terminal) for files with at least this many tokens.
PROGRESS_MIN_TOKENS = 200_000

Progress = Union[None, bool, str, Callable[[int], None]]


# -- the token stream --------------------------------------------------------------------------

def _piece_layout(n: int, batch_size: int, burn_in: int) -> list[tuple[int, int, int]]:
    """Split targets 0..n-1 into contiguous pieces: (context_start, score_start, end) per piece."""
    b = max(1, min(batch_size, n))
    bounds = [round(i * n / b) for i in range(b + 1)]
    return [(max(0, a - burn_in), a, e) for a, e in zip(bounds, bounds[1:]) if e > a]


def _select(state, j: int):
    """Column j of a state (each tensor (L, B, H)), kept as a batch of one, copied."""
    if isinstance(state, tuple):
        return tuple(s[:, j:j + 1].clone() for s in state)
    return state[:, j:j + 1].clone()


# An LSTM cell whose memory is at least this deep in saturation on the same side in two
# states counts as agreeing (tanh(20) = 1 - 8e-18; see _close).
SATURATED = 20.0


def _close(a, b, tol: float) -> bool:
    """Whether two states agree to `tol` (absolute and relative), elementwise.

    LSTM memory cells are compared too, except where both sit deep in saturation on the same
    side: trained models have integrator cells (c = 60 in one state, 90 in the other) whose
    difference does not show in the output (tanh(c) = 1 either way) and would otherwise make
    every piece re-run to its end. A strict comparison of c would be exact in all cases but
    sequential for such models; this allowance is the one place the check trusts the warm-up.
    """
    if not isinstance(a, tuple):
        return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
    if not torch.allclose(a[0].float(), b[0].float(), rtol=tol, atol=tol):
        return False
    ca, cb = a[1].float(), b[1].float()
    same = torch.isclose(ca, cb, rtol=tol, atol=tol)
    saturated = (ca * cb > 0) & (torch.minimum(ca.abs(), cb.abs()) >= SATURATED)
    return bool((same | saturated).all())


# How far two states may differ and still count as the same (`_close`), by the arithmetic that
# made them: a batch of B and a batch of 1 round differently, so this is a few units of rounding.
TOL_FP32 = 1e-4
TOL_TF32 = 5e-3    # TF32 keeps 10 mantissa bits (unit roundoff 2^-11 ~ 4.9e-4)
TOL_16BIT = 2e-2   # bf16 keeps 7 (unit roundoff 2^-8 ~ 3.9e-3); fp16, with 10, is covered too


def state_tolerance(device: torch.device | str, autocast_dtype: torch.dtype | None) -> float:
    """The tolerance of the exactness check for states computed on `device` in this precision.

    fp32 on a GPU is TF32 wherever PyTorch lets it be: cuDNN's recurrent layers by default
    (``torch.backends.cudnn.allow_tf32``), matmuls if the user turned
    ``torch.backends.cuda.matmul.allow_tf32`` on. Held to the fp32 tolerance, such states never
    agree and every piece is re-run sequentially to its end: correct, but the batch buys nothing.
    """
    if autocast_dtype is not None:
        return TOL_16BIT
    if torch.device(device).type == "cuda" and (torch.backends.cudnn.allow_tf32
                                                or torch.backends.cuda.matmul.allow_tf32):
        return TOL_TF32
    return TOL_FP32


def _clone(state):
    return tuple(s.clone() for s in state) if isinstance(state, tuple) else state.clone()


def stream_nll(model, ids: np.ndarray, batch_size: int = 1, window: int = 256, direction: int = 0,
               burn_in: int = 256, device: torch.device | str = "cpu",
               progress: Callable[[int], None] | None = None, autocast_dtype: torch.dtype | None = None,
               exact: bool = True, info: dict | None = None, collect: dict | None = None) -> float:
    """Total negative log-likelihood (nats) of `ids`, each token predicted once from its left context.

    ids are in reading order of `direction` (reverse the text for the backward stack). The
    input before the first token is <eos> from a zero state. With `batch_size > 1` the
    pieces are checked and repaired as the module docstring describes (``exact=False``: warm-up
    only). `progress(n)` is called with the number of tokens scored after each window; `info`,
    if given, receives ``pieces`` and ``rerun_tokens`` (tokens re-run by the exactness check).
    The model's train/eval mode is restored afterwards.
    """
    n = len(ids)
    if info is not None:
        info.update(pieces=0, rerun_tokens=0)
    if n == 0:
        return 0.0
    if collect is not None:
        # Per token, in stream order: the NLL (float64) and the features the softmax read
        # (float32; the continuous cache's keys). The features of a long text go to a temporary
        # file rather than memory.
        collect["nll"] = torch.zeros(n, dtype=torch.float64)
        collect["features"] = None             # (n, D), made when D is known
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _stream_nll(model, np.asarray(ids), batch_size, max(1, window), direction, max(0, burn_in),
                               device, progress, autocast_dtype, exact, info, collect)
    finally:
        if was_training:
            model.train()


def _stream_nll(model, ids, batch_size, window, direction, burn_in, device, progress, autocast_dtype,
                exact, info, collect=None) -> float:
    n = len(ids)
    stream = np.empty(n + 1, dtype=np.int64)   # input k predicts target k (= stream[k + 1])
    stream[0] = EOS_ID
    stream[1:] = ids
    pieces = _piece_layout(n, batch_size, burn_in)
    B = len(pieces)
    lens = [e - c for c, _, e in pieces]       # inputs fed to each column
    T = max(lens)
    # Chunk boundaries: every `window` steps, plus where a column starts scoring and where it
    # ends, so that the state at those times is seen.
    cuts = set(range(0, T, window)) | {T} | set(lens) | {a - c for c, a, _ in pieces if 0 < a - c < T}
    bounds = sorted(cuts)
    record = exact and B > 1
    tol = state_tolerance(device, autocast_dtype)

    def forward(x: np.ndarray, y: np.ndarray, scored: np.ndarray, state, starts=None):
        """Run (t, b) inputs from `state`: (per-column NLL sums (b,) float64, new state).

        With `collect`, also record each scored token's NLL and features at its index in the
        text: `starts[j]` is the index column j's first row predicts."""
        xt = torch.from_numpy(x).to(device)
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
              else no_autocast(device.type)):
            h, state = model(xt, state, direction)
        h = h.float()
        nll = model.nll(h, torch.from_numpy(y).to(device), reduction="none").view(x.shape)
        mask = torch.from_numpy(scored).to(device)
        per_token = to_float64(torch.where(mask, nll, 0.0))  # (on the CPU for MPS, which has no float64)
        if collect is not None:
            rows_nll, rows_h = per_token.cpu(), h.cpu()
            if collect["features"] is None:
                collect["features"] = feature_store(len(ids), h.shape[-1], collect)
            for j in range(x.shape[1]):
                rows = np.flatnonzero(scored[:, j])
                if len(rows):                  # scored rows are contiguous in a column
                    r0, r1 = int(rows[0]), int(rows[-1]) + 1
                    i0 = starts[j] + r0
                    collect["nll"][i0:i0 + r1 - r0] = rows_nll[r0:r1, j]
                    collect["features"][i0:i0 + r1 - r0] = rows_h[r0:r1, j].numpy()
        return per_token.sum(0), state

    chunk_nll: list[torch.Tensor] = []         # per chunk: (B,) NLL of the scored tokens
    chunk_state: list = []                     # per chunk: the state after it (when checking)
    state = None
    for t0, t1 in zip(bounds, bounds[1:]):
        x = np.full((t1 - t0, B), EOS_ID, dtype=np.int64)
        y = np.zeros((t1 - t0, B), dtype=np.int64)
        scored = np.zeros((t1 - t0, B), dtype=bool)
        for j, (c, a, _) in enumerate(pieces):
            u1 = min(t1, lens[j])
            if u1 <= t0:
                continue                       # this column has ended: padding
            x[: u1 - t0, j] = stream[c + t0: c + u1]
            y[: u1 - t0, j] = stream[c + t0 + 1: c + u1 + 1]
            s0 = max(t0, a - c)
            if s0 < u1:
                scored[s0 - t0: u1 - t0, j] = True
        sums, state = forward(x, y, scored, state, [c + t0 for c, _, _ in pieces])
        chunk_nll.append(sums)
        if record:
            chunk_state.append(_clone(state))
        if progress is not None:
            progress(int(scored.sum()))
    per = torch.stack(chunk_nll)               # (K, B)
    rerun = 0
    if record:
        end_chunk = {t: k for k, t in enumerate(bounds[1:])}  # chunk index that ends at time t
        exact_end = _select(chunk_state[end_chunk[lens[0]]], 0)   # piece 0 starts at the true start
        for j in range(1, B):
            c, a, e = pieces[j]
            last = end_chunk[lens[j]]
            if c == 0:                         # warmed up from the true start: exact already
                exact_end = _select(chunk_state[last], j)
                continue
            cur = exact_end                    # the exact state at stream position a
            if a - c > 0:
                k0 = end_chunk[a - c]          # the chunk that ends where scoring starts
                warm = _select(chunk_state[k0], j)
            else:                              # no warm-up: the column started from zeros
                k0, warm = -1, (tuple(torch.zeros_like(s) for s in cur) if isinstance(cur, tuple)
                                else torch.zeros_like(cur))
            met = _close(cur, warm, tol)
            k = k0
            while not met and k < last:
                k += 1
                t0, t1 = bounds[k], bounds[k + 1]
                x = stream[c + t0: c + t1].reshape(-1, 1)
                y = stream[c + t0 + 1: c + t1 + 1].reshape(-1, 1)
                sums, cur = forward(x, y, np.ones_like(x, dtype=bool), cur, [c + t0])
                per[k, j] = sums[0]
                rerun += t1 - t0
                met = _close(cur, _select(chunk_state[k], j), tol)
            exact_end = _select(chunk_state[last], j) if met else cur
    if info is not None:
        info.update(pieces=B, rerun_tokens=rerun)
    return float(per.sum().item())


# -- perplexity ----------------------------------------------------------------------------------

def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def evaluate_ids(model, ids: np.ndarray, batch_size: int = 1, device="cpu", window: int = 256,
                 progress: Callable[[int], None] | None = None, autocast_dtype=None, exact: bool = True,
                 burn_in: int = 256, cache: CacheSpec | Sequence[CacheSpec] | None = None,
                 dynamic: DynamicSpec | None = None) -> dict:
    """Loss (nats/token), perplexity and bits per token of an id stream, for each direction.

    Bidirectional models: ``forward_loss``/``backward_loss`` (and ``_ppl``) per direction, the
    backward stack reading the reversed stream; ``loss`` is their mean, so ``ppl`` is the
    geometric mean of the two perplexities.

    With `cache` (a :class:`~rnnlm.cache.CacheSpec`, or several: cache sizes scored from one
    pass), ``cache`` is also given: one entry per size and (θ, λ) of its grid with the mixture's ``loss``, ``ppl`` and ``bits_per_token`` (each
    direction with its own cache, combined like the plain numbers). With `dynamic` (a
    :class:`~rnnlm.dynamic.DynamicSpec`), ``dynamic``: one entry per setting (learning rate, decay
    and, for the RMS rule, ε: ``DynamicSpec.settings()``), the loss under dynamic evaluation (one
    sequential pass each, whatever `batch_size`; the RMS rule's statistics are measured once per
    direction on ``rms_data``, token ids here); with both, each of those
    entries has its own ``cache`` list, the cache over the adapting model's pass. The plain keys are
    unchanged.
    """
    n = len(ids)
    if n == 0:
        raise UsageError("nothing to evaluate: the text has no tokens")
    kw = dict(batch_size=batch_size, window=window, burn_in=burn_in, device=device, progress=progress,
              autocast_dtype=autocast_dtype, exact=exact)
    streams = [np.asarray(ids)]
    if getattr(model, "num_directions", 1) == 2:
        streams.append(np.ascontiguousarray(streams[0][::-1]))

    specs = [] if cache is None else [cache] if isinstance(cache, CacheSpec) else list(cache)

    def passes(run) -> tuple[list[float], list[list[torch.Tensor]]]:
        """One pass per direction, `run(direction, stream, collect)` -> NLL; with a cache, also
        each spec's (θ, λ) totals over what each pass collected: [direction][spec]."""
        nlls, cached = [], []
        for direction, stream in enumerate(streams):
            collect: dict | None = {} if specs else None
            nlls.append(run(direction, stream, collect))
            if specs:
                targets = torch.from_numpy(np.asarray(stream, dtype=np.int64))
                cached.append([cache_nll(collect["features"], targets, collect["nll"], spec, device)
                               for spec in specs])
        return nlls, cached

    def cache_entries(totals: list[list[torch.Tensor]]) -> list[dict]:
        return [_entry({"size": spec.size, "theta": spec.thetas[a], "lambda": spec.lambdas[b]},
                       [float(c[i][a, b]) / n for c in totals])
                for i, spec in enumerate(specs) for a, b in np.ndindex(len(spec.thetas), len(spec.lambdas))]

    nlls, cached = passes(lambda d, stream, collect: stream_nll(model, stream, direction=d, collect=collect, **kw))
    out: dict = {"nll": nlls[0], "loss": nlls[0] / n}
    if len(streams) == 2:
        fwd, bwd = nlls[0] / n, nlls[1] / n
        out.update(forward_loss=fwd, backward_loss=bwd, forward_ppl=_exp(fwd), backward_ppl=_exp(bwd),
                   nll=(nlls[0] + nlls[1]) / 2, loss=(fwd + bwd) / 2)
    out["ppl"] = _exp(out["loss"])
    out["bits_per_token"] = out["loss"] / math.log(2)
    if specs:
        out["cache"] = cache_entries(cached)
    if dynamic is not None:
        rms = [None] * len(streams)
        if isinstance(dynamic.rms_data, RMSStatistics):                          # measured before
            rms = _given_statistics(dynamic.rms_data, dynamic.segment, len(streams))
        elif dynamic.rms_data is not None:  # the RMS rule: statistics per direction, once for all settings
            stats = _stats_ids(dynamic.rms_data, model)
            if dynamic.measures_rms:                                             # (lr 0 needs none)
                rms = list(rms_statistics(model, stats, dynamic.segment, device, progress).per_direction)
        out["dynamic"] = []
        for lr, decay, eps in dynamic.settings():
            d_nlls, d_cached = passes(lambda d, stream, collect: dynamic_nll(
                model, stream, lr, decay, dynamic.segment, d, device, progress, collect, rms[d], eps))
            setting = {"lr": lr, "decay": decay, "segment": dynamic.segment, "rule": dynamic.rule}
            if eps is not None:
                setting["eps"] = eps
            entry = _entry(setting, [v / n for v in d_nlls])
            if specs:                      # the cache over the adapting model's features and predictions
                entry["cache"] = cache_entries(d_cached)
            out["dynamic"].append(entry)
    return out


def rms_statistics(model, ids, segment: int = 20, device="cpu",
                   progress: Callable[[int], None] | None = None) -> RMSStatistics:
    """The RMS rule's statistics of `model` on the token ids of a text (the training text), one
    :func:`~rnnlm.dynamic.gradient_rms` per reading direction (the backward stack reads the text
    reversed), measured with `segment`-token steps: give the result to any number of evaluations
    of the unchanged model as ``DynamicSpec(..., segment=segment, rms_data=stats)``."""
    ids = _stats_ids(ids, model)
    directions = getattr(model, "num_directions", 1)
    per = tuple(gradient_rms(model, ids if d == 0 else np.ascontiguousarray(ids[::-1]), segment, d, device,
                             progress=progress) for d in range(directions))
    return RMSStatistics(per, segment, len(ids))


def _given_statistics(stats: RMSStatistics, segment: int, directions: int) -> list:
    if stats.segment != segment:
        raise UsageError(f"the RMS statistics were measured with {stats.segment}-token segments; evaluate with "
                         f"the same segment length (DynamicSpec.segment is {segment})")
    if len(stats.per_direction) != directions:
        raise UsageError(f"the RMS statistics are for {len(stats.per_direction)} reading direction(s); "
                         f"this model has {directions}")
    return list(stats.per_direction)


def encode_rms_text(path: str | Path, vocab: Vocab, tokenizer: Tokenizer, encoding: str = "utf-8",
                    errors: str = "strict") -> np.ndarray:
    """The RMS rule's statistics text at `path` as token ids, encoded like an evaluated file."""
    rp = Path(path)
    if not rp.is_file():
        raise UsageError(f"statistics text for the RMS rule not found: {rp}" if not rp.exists()
                         else f"statistics text for the RMS rule is not a regular file: {rp}")
    check_readable(rp, "statistics text for the RMS rule")
    ids = np.asarray(encode_source(TextSource(rp), tokenizer, vocab, encoding, errors), dtype=np.int64)
    if len(ids) == 0:
        raise UsageError(f"statistics text for the RMS rule {rp} has no tokens")
    return ids


def _stats_ids(data, model) -> np.ndarray:
    """The RMS rule's statistics text as token ids (evaluate_ids takes ids; perplexity encodes a path)."""
    if isinstance(data, (str, Path)):
        raise UsageError("DynamicSpec.rms_data is a path: rnnlm.evaluate.perplexity encodes it; "
                         "evaluate_ids needs its token ids")
    ids = np.asarray(data)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError("DynamicSpec.rms_data must be a non-empty 1-D array of token ids")
    emb = getattr(model, "embedding", None)
    V = emb.num_embeddings if isinstance(emb, torch.nn.Embedding) else None
    if int(ids.min()) < 0 or (V is not None and int(ids.max()) >= V):
        raise UsageError(f"DynamicSpec.rms_data has token ids outside the vocabulary [0, {V})")
    return ids.astype(np.int64, copy=False)


def _entry(entry: dict, losses: list[float]) -> dict:
    """A cache or dynamic-evaluation result: `entry` plus loss, ppl and bits per token from the
    per-direction losses (a bidirectional model's forward_/backward_ keys and their mean)."""
    if len(losses) == 2:
        entry.update(forward_loss=losses[0], backward_loss=losses[1],
                     forward_ppl=_exp(losses[0]), backward_ppl=_exp(losses[1]))
    loss = sum(losses) / len(losses)
    entry.update(loss=loss, ppl=_exp(loss), bits_per_token=loss / math.log(2))
    return entry


def _progress_bar(progress: Progress, total: int) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """(callback, close) for a progress setting: a callable, True (a bar), "auto" or False/None."""
    if callable(progress):
        return progress, lambda: None
    show = progress is True or (progress == "auto" and total >= PROGRESS_MIN_TOKENS and sys.stderr.isatty())
    if not show:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc="evaluating", unit="tok", unit_scale=True, file=sys.stderr, leave=False,
               dynamic_ncols=True)
    return bar.update, bar.close


# A char-level text counts as space-separated words when at least this share of its characters
# (line breaks and <eos> aside) are spaces or tabs. English prose has ~16 %, German ~13 %, source
# code more; Chinese or Japanese text, DNA and the like have next to none.
WORD_SPACE_MIN = 0.05


def _word_count(ids: np.ndarray, vocab: Vocab) -> int | None:
    """Char level: the words of the text (maximal runs of non-space characters) plus its <eos>
    tokens, or None when the text does not separate words with spaces (fewer than WORD_SPACE_MIN
    of its characters, line breaks aside, are spaces): a per-"word" perplexity would then be a
    per-line one."""
    ids = np.asarray(ids, dtype=np.int64)
    space = np.array([len(t) == 1 and t.isspace() for t in vocab.itos], dtype=bool)
    line_break = np.array([t in ("\n", "\r") for t in vocab.itos], dtype=bool)
    space[EOS_ID] = line_break[EOS_ID] = True
    is_space = space[ids]
    breaks = int(np.count_nonzero(line_break[ids]))
    inline_spaces = int(np.count_nonzero(is_space)) - breaks
    if inline_spaces < WORD_SPACE_MIN * max(1, len(ids) - breaks):
        return None
    starts = ~is_space & np.concatenate([[True], is_space[:-1]])
    return int(np.count_nonzero(starts)) + int(np.count_nonzero(ids == EOS_ID))


def _check_errors(errors) -> None:
    """`errors` names a codecs error handler (checked now, not when the first bad byte is met)."""
    try:
        codecs.lookup_error(errors)
        b"\xff".decode("ascii", errors)  # a handler for encoding only (xmlcharrefreplace) fails here
    except UnicodeDecodeError:  # strict
        pass
    except (LookupError, TypeError):
        raise UsageError(f"errors must name a codecs error handler such as 'strict', 'replace' or 'ignore', "
                         f"got {errors!r}") from None


def perplexity(model, vocab: Vocab, tokenizer: Tokenizer, path: str | Path, batch_size: int = 1,
               device="cpu", encoding: str = "utf-8", errors: str = "strict", progress: Progress = False,
               exact: bool = True, cache: CacheSpec | Sequence[CacheSpec] | None = None,
               dynamic: DynamicSpec | None = None) -> dict:
    """Evaluate a text file as CONTRACT.md defines; returns the JSON-ready result.

    progress: False/None (quiet), True (a tqdm bar on stderr), "auto" (a bar when stderr is a
    terminal and the file has at least PROGRESS_MIN_TOKENS tokens), or a callable receiving the
    number of tokens each step scored, an increment (the calls sum to the tokens, times two for a
    bidirectional model).

    Keys: tokens, oov (tokens outside the vocabulary), oov_rate, nll (total, nats), loss,
    ppl, bits_per_token; for char models also bpc, and words and word_ppl = exp(nll / words) with
    words = whitespace-separated words + <eos> tokens, comparable with a word model's perplexity
    (only for text that separates words with spaces: see _word_count); for bidirectional models
    forward_/backward_ loss and ppl. With `cache` (the continuous cache, :mod:`rnnlm.cache`),
    ``cache``: a list with one entry per size (a list of specs) and (θ, λ) of the grid, ``{"size",
    "theta", "lambda", "loss",
    "ppl", "bits_per_token"}`` (``bpc`` too at char level); with `dynamic` (dynamic evaluation,
    :mod:`rnnlm.dynamic`), ``dynamic``: one entry per setting, ``{"lr", "decay", "segment", "rule",
    "loss", "ppl", "bits_per_token"}`` ("rule" is "sgd", or "rms" with an "eps" key too, when
    ``dynamic.rms_data`` names the statistics text, encoded here like the evaluated file). The plain
    numbers are unchanged.
    """
    if cache is not None and not (isinstance(cache, CacheSpec) or (
            isinstance(cache, (list, tuple)) and cache and all(isinstance(c, CacheSpec) for c in cache))):
        raise UsageError(f"cache must be a rnnlm.cache.CacheSpec or a list of them, got {cache!r}")
    if dynamic is not None and not isinstance(dynamic, DynamicSpec):
        raise UsageError(f"dynamic must be a rnnlm.dynamic.DynamicSpec, got {dynamic!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if progress not in (False, None, True, "auto") and not callable(progress):
        raise UsageError(f"progress must be False, True, 'auto' or a callable, got {progress!r}")
    _check_errors(errors)
    from .allocator import tune_allocator
    tune_allocator()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"evaluation file not found: {p}")
    check_readable(p, "evaluation file")
    stats: dict = {}
    try:
        ids = encode_source(TextSource(p), tokenizer, vocab, encoding, errors, stats=stats,
                            progress=None if progress == "auto" else progress is True)
    except TypeError:  # an encode_source without stats/progress
        ids = encode_source(TextSource(p), tokenizer, vocab, encoding, errors)
    if len(ids) == 0:
        raise UsageError(f"evaluation file {p} has no tokens")
    n = len(ids)
    oov = int(stats["oov"]) if "oov" in stats else int(np.count_nonzero(np.asarray(ids) == UNK_ID))
    directions = getattr(model, "num_directions", 1)
    passes = 1 + (len(dynamic.settings()) if dynamic is not None else 0)
    stats_tokens = 0
    if dynamic is not None and isinstance(dynamic.rms_data, (str, Path)):   # the RMS rule's statistics text
        dynamic = dataclasses.replace(dynamic, rms_data=encode_rms_text(dynamic.rms_data, vocab, tokenizer,
                                                                        encoding, errors))
    if dynamic is not None and dynamic.measures_rms:
        pieces, per_piece = stats_layout(len(dynamic.rms_data), dynamic.segment)
        stats_tokens = pieces * per_piece
    if progress == "auto" and dynamic is not None and sys.stderr.isatty():
        progress = True                        # sequential passes: slow whatever the length
    callback, close = _progress_bar(progress, (n * passes + stats_tokens) * directions)
    try:
        res = evaluate_ids(model, ids, batch_size, device, progress=callback, exact=exact, cache=cache,
                           dynamic=dynamic)
    finally:
        close()
    result = {"tokens": n, "oov": oov, "oov_rate": oov / n, **res,
              "batch_size": batch_size, "level": tokenizer.level, "file": str(p)}
    if tokenizer.level == "char":
        result["bpc"] = result["bits_per_token"]
        entries = result.get("cache", []) + result.get("dynamic", [])
        for entry in entries + [c for e in result.get("dynamic", []) for c in e.get("cache", [])]:
            entry["bpc"] = entry["bits_per_token"]
        words = _word_count(ids, vocab)
        if words is not None:  # only for text that separates its words with spaces
            result["words"] = words
            result["word_ppl"] = _exp(result["nll"] / max(1, words))
    return result


# -- sentence scoring ----------------------------------------------------------------------------

def _sentence_tokens(tokenizer: Tokenizer, sentence: str) -> list[str]:
    text = tokenizer.clean(sentence)
    return list(text) if tokenizer.level == "char" else tokenizer.split_words(text)


_SCORE_LOGITS = 1 << 24  # logits held at once while scoring (64 MB in float32)


def score_sentences(model, vocab: Vocab, tokenizer: Tokenizer, sentences: Iterable[str], device="cpu",
                    batch_size: int = 64) -> list[dict]:
    """Score each sentence independently: fresh state, previous token <eos>, EOS appended.

    Returns, per sentence, ``text``, ``tokens`` (EOS included), ``logprob`` (natural-log
    probability of its tokens and its EOS), ``ppl`` = exp(-logprob / tokens) and ``oov``.
    Sentences are batched by length with <eos> padding after their end; the model reads left
    to right, so padding never reaches a scored position. Uses the forward direction.
    """
    if isinstance(sentences, str):
        raise UsageError("score_sentences takes a list of sentences; for one sentence pass [sentence]")
    device = torch.device(device)
    sents = list(sentences)
    bad = [s for s in sents if not isinstance(s, str)]
    if bad:
        raise UsageError(f"score_sentences takes strings, got {type(bad[0]).__name__}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    encoded, oovs = [], []
    for s in sents:
        toks = _sentence_tokens(tokenizer, s)
        ids = vocab.encode(toks)
        oovs.append(sum(1 for t, i in zip(toks, ids) if i == UNK_ID and t != UNK))
        encoded.append(ids + [EOS_ID])
    results: list[dict | None] = [None] * len(sents)
    order = sorted(range(len(sents)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b0 in range(0, len(order), max(1, batch_size)):
                idx = order[b0:b0 + max(1, batch_size)]
                T = max(len(encoded[i]) for i in idx)
                x = torch.full((T, len(idx)), EOS_ID, dtype=torch.long)
                y = torch.zeros((T, len(idx)), dtype=torch.long)
                m = torch.zeros((T, len(idx)), dtype=torch.bool)
                for j, i in enumerate(idx):
                    seq = torch.tensor([EOS_ID] + encoded[i])
                    L = len(encoded[i])
                    x[:L, j] = seq[:-1]
                    y[:L, j] = seq[1:]
                    m[:L, j] = True
                # Long sentences go through in time chunks with the state carried, so memory stays
                # bounded (about _SCORE_LOGITS logits at a time) whatever a line's length.
                chunk = max(1, _SCORE_LOGITS // (len(idx) * max(1, len(vocab))))
                nll = torch.zeros(len(idx), dtype=torch.float64)
                state = None
                for t0 in range(0, T, chunk):
                    t1 = min(T, t0 + chunk)
                    h, state = model(x[t0:t1].to(device), state, 0)
                    part = model.nll(h.float(), y[t0:t1].to(device), reduction="none").view(t1 - t0, len(idx))
                    nll += torch.where(m[t0:t1], part.cpu().double(), 0.0).sum(0)
                for j, i in enumerate(idx):
                    lp = -float(nll[j])
                    k = len(encoded[i])
                    results[i] = {"text": sents[i], "tokens": k, "logprob": lp, "ppl": _exp(-lp / k),
                                  "oov": oovs[i]}
    finally:
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def text_ids(text: str, tokenizer: Tokenizer, vocab: Vocab) -> np.ndarray:
    """Ids of a text as eval-perplexity would see it (the tokenization of a file holding `text`)."""
    return encode_text(text, tokenizer, vocab)


__all__ = ["perplexity", "evaluate_ids", "stream_nll", "score_sentences", "text_ids", "PROGRESS_MIN_TOKENS"]
