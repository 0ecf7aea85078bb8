"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals, ICML 2018): the SGD and the RMS rule.

The model keeps learning while it reads: the text is one stream cut into segments of
`segment` tokens; each segment is first scored with the current weights, then one gradient step
is taken on that segment's mean loss,

    θ ← θ − lr · ∇L(segment) + decay · (θ₀ − θ)                          (SGD)

(θ₀ the trained weights; the decay pulls the adapted weights back toward them), and the hidden
state runs on into the next segment. Every token is still predicted exactly once, from its left
context only: the weights that score a token were adapted on the tokens before it. The text is
read in one sequence (a batch of parallel pieces would adapt each piece on its own), in fp32, with
dropout off; the model's weights are restored afterwards.

The RMS rule (the paper's main form, "RMS with a global prior") first measures each weight's
root-mean-square gradient s = √MS on other text, the training text, with the trained weights
(:func:`gradient_rms`), then divides each step by it and scales the decay by it:

    θ ← θ − lr · ∇L(segment) / (s + ε) + min(1, decay · s / s̄) ⊙ (θ₀ − θ)   (RMS)

s̄ is the mean of s over all weights and ε = eps · s̄ (`eps`, default RMS_EPS). Weights whose
gradients are usually small (the rows of rare words) take larger steps, and weights that matter
more are held closer to their trained values. `eps` sets how much larger: without it, a word seen
once in the statistics text would take steps up to 5·10⁴ times the typical one (PTB's rarest
embedding row has s = 2·10⁻⁵ s̄). On PTB, lr 1e-4 with
eps 0.001 diverged; with eps 0.1 the same lr gave the lowest validation perplexity.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .cache import feature_store
from .errors import UsageError
from .models import detach_state
from .ops import to_float64
from .text import EOS_ID


RMS_EPS = 0.1       # the RMS rule's default ε, as a share of the mean RMS gradient s̄ (chosen on PTB validation)
STATS_BATCH = 64    # parallel pieces of the statistics text in gradient_rms


@dataclass(frozen=True, eq=False)   # compared by identity: it holds tensors
class RMSStatistics:
    """The RMS rule's statistics, measured once (:func:`rnnlm.evaluate.rms_statistics`) and given
    to any number of evaluations of the same, unchanged model as ``DynamicSpec.rms_data``.

    per_direction: for each reading direction of the model, :func:`gradient_rms`'s list (one
    tensor, or None, per parameter); segment: the segment length they were measured with (a
    DynamicSpec must use the same); tokens: the length of the statistics text."""

    per_direction: tuple
    segment: int
    tokens: int


@dataclass(frozen=True, eq=False)   # compared by identity: rms_data may be an array
class DynamicSpec:
    """The learning rates to try, the decay (or several: every pair is one pass over the text), the
    segment length and, for the RMS rule, the text its statistics are measured on."""

    lrs: tuple[float, ...]
    decay: float | tuple[float, ...] = 0.0
    segment: int = 20
    # The RMS rule's statistics text: a path (rnnlm.evaluate.perplexity encodes it with the
    # model's vocabulary) or its token ids (rnnlm.evaluate.evaluate_ids); or the statistics
    # themselves, measured before (RMSStatistics). None: the SGD rule.
    rms_data: str | Path | np.ndarray | RMSStatistics | None = field(default=None, repr=False)
    rms_eps: float | tuple[float, ...] = RMS_EPS    # the RMS rule's ε as a share of s̄ (or several to try)

    @property
    def rule(self) -> str:
        return "sgd" if self.rms_data is None else "rms"

    @property
    def decays(self) -> tuple[float, ...]:
        return self.decay if isinstance(self.decay, tuple) else (self.decay,)

    @property
    def epses(self) -> tuple[float | None, ...]:
        """The RMS rule's ε values to try; (None,) for the SGD rule, which has none."""
        if self.rms_data is None:
            return (None,)
        return self.rms_eps if isinstance(self.rms_eps, tuple) else (self.rms_eps,)

    @property
    def measures_rms(self) -> bool:
        """Does evaluating this spec measure the RMS rule's statistics (the rule from a text, not
        from statistics given, and an lr > 0)?"""
        return (self.rms_data is not None and not isinstance(self.rms_data, RMSStatistics)
                and any(lr > 0 for lr in self.lrs))

    def settings(self) -> list[tuple[float, float, float | None]]:
        """Every (lr, decay, eps) to evaluate, one pass each, in this order."""
        return [(lr, decay, eps) for lr in self.lrs for decay in self.decays for eps in self.epses]

    def __post_init__(self) -> None:
        if not self.lrs:
            raise UsageError("dynamic evaluation needs at least one learning rate")
        for lr in self.lrs:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
                raise UsageError(f"dynamic learning rate (--dynamic-lr) must be a finite number >= 0, got {lr!r}")
        for name in ("decay", "rms_eps"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.decay == ():
            raise UsageError("dynamic decay (--dynamic-decay) needs at least one value")
        for decay in self.decays:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
                raise UsageError(f"dynamic decay (--dynamic-decay) must be in [0, 1], got {decay!r}")
        eps_values = self.rms_eps if isinstance(self.rms_eps, tuple) else (self.rms_eps,)
        if not eps_values or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e)
                                 or e <= 0 for e in eps_values):
            raise UsageError(f"the RMS rule's eps (--dynamic-rms-eps) must be finite numbers > 0, got {self.rms_eps!r}")
        if isinstance(self.segment, bool) or not isinstance(self.segment, (int, np.integer)) or self.segment < 1:
            raise UsageError(f"dynamic segment (--dynamic-segment) must be an integer >= 1, got {self.segment!r}")


@contextmanager
def _adapting(model, device: torch.device, sparse_embedding: bool, changes_weights: bool = True):
    """Weights that take gradients, dropout off and cuDNN off for the duration; afterwards the
    weights' values (saved only when `changes_weights`), `requires_grad`, the model's mode and the
    embedding's `sparse` flag are as they were (also after an error or an interrupt). Yields
    (params, their saved values or None)."""
    params = list(model.parameters())          # all of them adapt, frozen ones included
    saved = [p.detach().clone() for p in params] if changes_weights else None
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()                                          # no dropout
    # cuDNN's recurrent backward runs only in training mode; its slower native kernels do not care.
    no_cudnn = torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else nullcontext()
    # The embedding's gradient as the rows the segment used (sparse) rather than a dense
    # vocabulary-sized array: about twice as fast with WikiText-2's 33,278 x 400 embedding.
    emb = getattr(model, "embedding", None)
    emb_sparse = emb.sparse if isinstance(emb, torch.nn.Embedding) else None
    try:
        if emb_sparse is not None:
            emb.sparse = sparse_embedding
        for p in params:
            p.requires_grad_(True)
        # inference_mode(False): callable from inside torch.inference_mode() too.
        with torch.inference_mode(False), no_cudnn:
            yield params, saved
    finally:
        if emb_sparse is not None:
            emb.sparse = emb_sparse
        with torch.no_grad():
            for k, (p, flag) in enumerate(zip(params, flags)):
                if saved is not None:
                    p.copy_(saved[k])
                p.requires_grad_(flag)
        if was_training:
            model.train()


def stats_layout(n: int, segment: int, batch: int = STATS_BATCH) -> tuple[int, int]:
    """How :func:`gradient_rms` reads `n` tokens: (pieces, tokens per piece); it uses pieces × tokens."""
    pieces = max(1, min(batch, n // max(1, segment)))
    return pieces, n // pieces


def gradient_rms(model, ids: np.ndarray, segment: int = 20, direction: int = 0, device: torch.device | str = "cpu",
                 batch: int = STATS_BATCH, progress: Callable[[int], None] | None = None) -> list[torch.Tensor | None]:
    """The RMS rule's statistics: each weight's root-mean-square gradient √MS, one tensor per
    ``model.parameters()`` entry (float32, on `device`), or None for a parameter this direction
    never uses (a bidirectional model's other stack).

    `ids` (the training text, in the reading order of `direction`) is cut into `batch` contiguous
    pieces read in parallel, in steps of `segment` tokens with the state carried; MS is the mean
    over the steps of the squared gradient of each step's mean loss, with the model's current
    weights (which are not changed). Dropout is off, as in dynamic evaluation. The gradient is that
    of a mean over `batch` × `segment` tokens, so s is on that scale (a text shorter than `batch`
    segments is read in fewer pieces, which makes s larger, and the learning rates that suit it
    larger too: give the whole training text).
    """
    device = torch.device(device)
    n = len(ids)
    if n < 1:
        raise UsageError("the statistics text for the RMS rule has no tokens")
    B, L = stats_layout(n, segment, batch)
    stream = np.concatenate([[EOS_ID], np.asarray(ids, dtype=np.int64)])
    x_all = torch.from_numpy(stream[:B * L].reshape(B, L).T.copy())          # (L, B): piece b reads column b
    y_all = torch.from_numpy(stream[1:B * L + 1].reshape(B, L).T.copy())
    with _adapting(model, device, sparse_embedding=False, changes_weights=False) as (params, _):
        ms = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        used = [False] * len(params)
        steps, state = 0, None
        with torch.enable_grad():
            for s0 in range(0, L, segment):
                s1 = min(L, s0 + segment)
                x, y = x_all[s0:s1].to(device), y_all[s0:s1].to(device)
                h, new_state = model(x, state, direction)
                loss = model.nll(h.reshape(-1, h.size(-1)).float(), y.reshape(-1), reduction="mean")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for k, (m, g) in enumerate(zip(ms, grads)):
                        if g is not None:
                            m.addcmul_(g, g)
                            used[k] = True
                steps += 1
                state = detach_state(new_state)
                if progress is not None:
                    progress((s1 - s0) * B)
    return [m.div_(steps).sqrt_() if u else None for m, u in zip(ms, used)]


def dynamic_nll(model, ids: np.ndarray, lr: float, decay: float = 0.0, segment: int = 20, direction: int = 0,
                device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
                collect: dict | None = None, rms: Sequence[torch.Tensor] | None = None,
                eps: float | None = None) -> float:
    """Total NLL (nats) of `ids` under dynamic evaluation with learning rate `lr`.

    ids are in the reading order of `direction`; the first token is predicted from the zero state
    after <eos>, as in :func:`rnnlm.evaluate.stream_nll`. lr = 0 is the static model's number.
    The model's weights, its train/eval mode and its gradients are as they were afterwards.
    `collect`, if given, receives each token's ``nll`` and ``features`` as
    :func:`rnnlm.evaluate.stream_nll` gives them (for the continuous cache on top).
    `rms` (from :func:`gradient_rms`, one tensor per parameter, None for those the direction does
    not use) selects the RMS rule, with ε = `eps` · s̄ (default RMS_EPS) and s̄ the mean over the
    used ones; without it, the SGD rule (see the module's docstring).

    A pass whose adaptation diverges (the total stops being finite: NaN or infinite weights) stops
    there and returns that total: the rest of the text cannot bring it back, and a learning rate
    too large for the model then costs a few segments instead of a whole pass. `collect`'s NLLs are
    NaN from there on.
    """
    device = torch.device(device)
    eps = RMS_EPS if eps is None else eps
    n = len(ids)
    total = 0.0
    with _adapting(model, device, sparse_embedding=True) as (params, saved):
        denoms = rates = None
        if rms is not None:
            if len(rms) != len(params) or any(r is not None and r.shape != p.shape for r, p in zip(rms, params)):
                raise UsageError("the RMS statistics do not match the model's parameters")
            used = [r for r in rms if r is not None]
            mean = sum(float(to_float64(r).sum()) for r in used) / max(1, sum(r.numel() for r in used))
            if not mean > 0 or not math.isfinite(mean):
                raise UsageError("the statistics text for the RMS rule gave no gradient (mean RMS gradient "
                                 f"{mean:g}); give a longer text, the training text")
            if not (math.isfinite(eps) and eps > 0):
                raise UsageError(f"the RMS rule's eps must be a finite number > 0, got {eps!r}")
            # (a parameter without statistics has no gradient in this direction: it never moves)
            denoms = [None if r is None else r.to(device, torch.float32) + eps * mean for r in rms]
            if decay > 0:
                rates = [None if r is None else (r.to(device, torch.float32) * (decay / mean)).clamp_(max=1.0)
                         for r in rms]
        with torch.set_grad_enabled(lr > 0):
            stream = torch.from_numpy(np.concatenate([[EOS_ID], np.asarray(ids, dtype=np.int64)]))
            state = None
            for s0 in range(0, n, segment):
                s1 = min(n, s0 + segment)
                x = stream[s0:s1].view(-1, 1).to(device)
                y = stream[s0 + 1:s1 + 1].to(device)
                h, new_state = model(x, state, direction)
                h2 = h.reshape(-1, h.size(-1)).float()
                per_token = model.nll(h2, y, reduction="none")
                nll = per_token.sum()
                total += float(to_float64(per_token.detach()).sum())   # summed in float64, as stream_nll does
                if collect is not None:
                    if collect.get("features") is None:
                        collect["nll"] = torch.zeros(n, dtype=torch.float64)
                        collect["features"] = feature_store(n, h2.size(-1), collect)
                    collect["nll"][s0:s1] = per_token.detach().cpu().double()
                    collect["features"][s0:s1] = h2.detach().cpu().numpy()
                if lr > 0 and s1 < n:          # (no step after the last segment: nothing left to score)
                    grads = torch.autograd.grad(nll / (s1 - s0), params, allow_unused=True)
                    with torch.no_grad():
                        for k, (p, g, p0) in enumerate(zip(params, grads, saved)):
                            if denoms is not None and denoms[k] is None:
                                continue                      # no statistics: a weight this direction never uses
                            pull = (p0 - p) if decay > 0 else None   # θ₀ − θ, from the weights before the step
                            if g is not None:
                                if denoms is None:
                                    p.sub_(g, alpha=lr)
                                elif g.is_sparse:             # the embedding: only the rows the segment used
                                    g = g.coalesce()
                                    rows = g.indices()[0]
                                    p.index_add_(0, rows, g.values() / denoms[k][rows], alpha=-lr)
                                else:
                                    p.addcdiv_(g, denoms[k], value=-lr)
                            if pull is not None:
                                p.add_(pull if rates is None else pull.mul_(rates[k]),
                                       alpha=decay if rates is None else 1.0)
                state = detach_state(new_state)
                if progress is not None:
                    progress(s1 - s0)
                if not math.isfinite(total):           # diverged: nothing after this can undo it
                    if collect is not None:
                        collect["nll"][s1:] = float("nan")
                    if progress is not None and s1 < n:
                        progress(n - s1)
                    break
    return total
