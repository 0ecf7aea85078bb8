"""The continuous cache (Grave, Joulin & Usunier, ICLR 2017), an evaluation-time addition.

A trained model's prediction at time t is mixed with a distribution over the words that
followed the last `size` positions, weighted by how alike those positions' features are to the
current ones:

    p(w | t) = (1 - λ) p_model(w | t) + λ p_cache(w | t)
    p_cache(w | t) = Σ_{i in [t - size, t), y_i = w} exp(θ h_t·h_i) / Σ_{i in [t - size, t)} exp(θ h_t·h_i)

where h_i are the features the softmax reads at position i (the top layer's outputs, after any
head or tied projection) and y_i the token that came next. Nothing is trained: θ (how sharply
the cache attends to similar contexts) and λ (how much it is trusted) are chosen on validation
text, and the cache size bounds how far back it looks. The first position, with an empty cache,
is predicted by the model alone.

Only the target's probability is needed: log p(y_t) is computed from the model's own
log p_model(y_t) and the cache's weight on positions whose next token was y_t, in float64 (the
similarities too) and mixed in log space, so a target the model gives probability 1e-300 and the
cache 0 still scores exactly.
One pass over the features scores every (θ, λ) of a grid: the similarities are computed once per
block of positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import UsageError
from .ops import float64_device, to_float64


@dataclass(frozen=True)
class CacheSpec:
    """A cache size and the θ, λ values to score (every combination: a grid)."""

    size: int
    thetas: tuple[float, ...] = (1.0,)
    lambdas: tuple[float, ...] = (0.1,)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise UsageError(f"the cache size must be an integer >= 1, got {self.size!r}")
        if not self.thetas or not self.lambdas:
            raise UsageError("the cache needs at least one theta and one lambda")
        for t in self.thetas:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise UsageError(f"cache theta (--cache-theta) must be a finite number >= 0, got {t!r}")
        for lam in self.lambdas:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
                raise UsageError(f"cache lambda (--cache-lambda) must be in [0, 1], got {lam!r}")

    def grid(self) -> list[tuple[float, float]]:
        """(θ, λ) pairs in the order results are reported: θ-major."""
        return [(t, lam) for t in self.thetas for lam in self.lambdas]


def parse_values(text: str, option: str) -> tuple[float, ...]:
    """'0.1,0.2, 0.3' -> (0.1, 0.2, 0.3); a bad entry is a UsageError naming `option`."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option} takes a number or a comma-separated list of numbers, got {text!r}") from None
    if len(set(values)) != len(values):
        raise UsageError(f"{option} lists a value twice: {text!r}")
    return values


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """'100,500' -> (100, 500): cache sizes, whole numbers >= 1; otherwise a UsageError naming `option`."""
    values = parse_values(text, option)
    if not all(math.isfinite(v) and v == int(v) and v >= 1 for v in values):
        raise UsageError(f"{option} takes whole numbers >= 1, got {text!r}")
    return tuple(int(v) for v in values)


# Features of more than this many bytes are kept in a temporary file (a memory map), not in memory.
FEATURES_IN_MEMORY_MAX = 1 << 30


def feature_store(n: int, dim: int, collect: dict) -> np.ndarray:
    """An (n, dim) float32 array for the per-token features: in memory, or for a long text a
    memory-mapped temporary file, deleted when its last reference goes (`collect["_tmpdir"]`)."""
    if n * dim * 4 <= FEATURES_IN_MEMORY_MAX:
        return np.zeros((n, dim), dtype=np.float32)
    import tempfile
    from pathlib import Path
    tmp = tempfile.TemporaryDirectory(prefix="rnnlm-features-")
    collect["_tmpdir"] = tmp
    return np.lib.format.open_memmap(Path(tmp.name) / "features.npy", mode="w+", dtype=np.float32, shape=(n, dim))


# Positions scored together. Each block reads its own positions and the `size` before them; small
# blocks waste little on the masked-out part of the (block, size + block) similarity matrix and
# keep it in cache (measured: 40,000 positions at size 2,000 took 3.0 s in blocks of 256, 16.4 s in
# blocks of 2,000).
BLOCK = 256


def cache_nll(features: torch.Tensor, targets: torch.Tensor, model_nll: torch.Tensor, spec: CacheSpec,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Total NLL (nats, float64) of the targets under the cache mixture, for every (θ, λ) of `spec`.

    features: (n, D) the softmax's input at each position (position t predicts targets[t]);
    targets: (n,) token ids; model_nll: (n,) the model's own -log p(targets[t]).
    Returns a (len(thetas), len(lambdas)) float64 tensor on the CPU.
    """
    n = int(targets.shape[0])
    if features.shape[0] != n or model_nll.shape[0] != n:
        raise ValueError("features, targets and model_nll must have the same length")
    device = float64_device(device)              # computed in float64: on the CPU for MPS
    lams = np.asarray(spec.lambdas, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_keep = torch.tensor(np.log1p(-lams), device=device)   # log(1 - λ); -inf at λ = 1
        log_lam = torch.tensor(np.log(lams), device=device)       # log λ; -inf at λ = 0
    total = torch.zeros(len(spec.thetas), len(lams), dtype=torch.float64, device=device)
    W = min(spec.size, n)                         # a cache longer than the text holds all of it
    for q0 in range(0, n, BLOCK):
        q1 = min(n, q0 + BLOCK)
        k0 = max(0, q0 - W)                       # keys k0 .. q1-2 can serve queries q0 .. q1-1
        lp_model = -torch.as_tensor(model_nll[q0:q1]).to(device=device, dtype=torch.float64)   # (bq,)
        if q1 - 1 <= k0:                          # only position 0: an empty cache
            total -= lp_model.sum()
            continue
        q = torch.as_tensor(features[q0:q1]).to(device=device, dtype=torch.float64)
        k = torch.as_tensor(features[k0:q1 - 1]).to(device=device, dtype=torch.float64)
        sim = q @ k.T                             # (bq, bk) h_t · h_i
        tq = torch.arange(q0, q1, device=device).unsqueeze(1)
        tk = torch.arange(k0, q1 - 1, device=device).unsqueeze(0)
        valid = (tk < tq) & (tk >= tq - W)        # i in [t - size, t)
        yq = torch.as_tensor(targets[q0:q1]).to(device).unsqueeze(1)
        yk = torch.as_tensor(targets[k0:q1 - 1]).to(device).unsqueeze(0)
        match = valid & (yk == yq)                # the token after i is this target
        has_cache, has_hit = valid.any(1), match.any(1)    # has_cache is False only at position 0
        # θ >= 0, so θ·(s - max s) <= 0: the exponentials cannot overflow.
        top = torch.where(valid, sim, float("-inf")).amax(1, keepdim=True)
        dist = torch.where(valid, sim - torch.where(has_cache.unsqueeze(1), top, 0.0), 0.0)
        for a, theta in enumerate(spec.thetas):
            e = torch.where(valid, torch.exp(dist * theta), 0.0)
            hit = torch.where(match, e, 0.0).sum(1)
            lp_cache = torch.log(hit) - torch.log(e.sum(1).clamp_min(1.0))
            # Hits more than ~708 nats below the best position are subnormal or 0 in float64:
            # those rows are taken again in log-sum-exp form, exact at any distance.
            lost = has_hit & (hit < torch.finfo(torch.float64).tiny)
            if bool(lost.any()):
                z = dist[lost] * theta
                lp_cache[lost] = (torch.logsumexp(torch.where(match[lost], z, float("-inf")), 1)
                                  - torch.logsumexp(torch.where(valid[lost], z, float("-inf")), 1))
            lp = torch.logaddexp(log_keep.unsqueeze(0) + lp_model.unsqueeze(1),
                                 log_lam.unsqueeze(0) + lp_cache.unsqueeze(1))          # (bq, nλ)
            lp = torch.where(has_cache.unsqueeze(1), lp, lp_model.unsqueeze(1))
            total[a] -= lp.sum(0)
    return total.cpu()


def cache_distribution(features: torch.Tensor, targets: Sequence[int], model_probs: torch.Tensor, t: int,
                       size: int, theta: float, lam: float) -> torch.Tensor:
    """The whole mixture distribution at position t, (V,) float64: the definition written out,
    for tests and for readers (`cache_nll` scores only the target)."""
    p = to_float64(model_probs[t]).clone()
    lo = max(0, t - size)
    if t == lo:
        return p
    sim = to_float64(features[lo:t]) @ to_float64(features[t]) * theta
    weights = torch.softmax(sim, 0)
    p_cache = torch.zeros_like(p)
    p_cache.index_add_(0, torch.as_tensor(list(targets[lo:t]), dtype=torch.long, device=p.device), weights)
    return (1 - lam) * p + lam * p_cache
