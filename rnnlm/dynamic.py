"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals, ICML 2018), the SGD form.

The model keeps learning while it reads: the text is one stream cut into segments of
`segment` tokens; each segment is first scored with the current weights, then one gradient step
is taken on that segment's mean loss,

    θ ← θ − lr · ∇L(segment) + decay · (θ₀ − θ)

(θ₀ the trained weights; the decay pulls the adapted weights back toward them), and the hidden
state runs on into the next segment. Every token is still predicted exactly once, from its left
context only: the weights that score a token were adapted on the tokens before it. The text is
read in one sequence (a batch of parallel pieces would adapt each piece on its own), in fp32, with
dropout off; the model's weights are restored afterwards.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .cache import feature_store
from .errors import UsageError
from .models import detach_state
from .text import EOS_ID


@dataclass(frozen=True)
class DynamicSpec:
    """The learning rates to try (one pass over the text each), the decay and the segment length."""

    lrs: tuple[float, ...]
    decay: float = 0.0
    segment: int = 20

    def __post_init__(self) -> None:
        if not self.lrs:
            raise UsageError("dynamic evaluation needs at least one learning rate")
        for lr in self.lrs:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
                raise UsageError(f"dynamic learning rate (--dynamic-lr) must be a finite number >= 0, got {lr!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay <= 1.0:
            raise UsageError(f"dynamic decay (--dynamic-decay) must be in [0, 1], got {self.decay!r}")
        if isinstance(self.segment, bool) or not isinstance(self.segment, (int, np.integer)) or self.segment < 1:
            raise UsageError(f"dynamic segment (--dynamic-segment) must be an integer >= 1, got {self.segment!r}")


def dynamic_nll(model, ids: np.ndarray, lr: float, decay: float = 0.0, segment: int = 20, direction: int = 0,
                device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
                collect: dict | None = None) -> float:
    """Total NLL (nats) of `ids` under dynamic evaluation with learning rate `lr`.

    ids are in the reading order of `direction`; the first token is predicted from the zero state
    after <eos>, as in :func:`rnnlm.evaluate.stream_nll`. lr = 0 is the static model's number.
    The model's weights, its train/eval mode and its gradients are as they were afterwards.
    `collect`, if given, receives each token's ``nll`` and ``features`` as
    :func:`rnnlm.evaluate.stream_nll` gives them (for the continuous cache on top).
    """
    device = torch.device(device)
    n = len(ids)
    params = list(model.parameters())          # all of them adapt, frozen ones included
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()                                          # no dropout
    # cuDNN's recurrent backward runs only in training mode; its slower native kernels do not care.
    no_cudnn = torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else nullcontext()
    # The embedding's gradient as the rows the segment used (sparse) rather than a dense
    # vocabulary-sized array: about twice as fast with WikiText-2's 33,278 x 400 embedding.
    emb = getattr(model, "embedding", None)
    emb_sparse = emb.sparse if isinstance(emb, torch.nn.Embedding) else None
    total = 0.0
    try:
        if emb_sparse is not None:
            emb.sparse = True
        for p in params:
            p.requires_grad_(True)
        # inference_mode(False): callable from inside torch.inference_mode() too.
        with torch.inference_mode(False), torch.set_grad_enabled(lr > 0), no_cudnn:
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
                total += float(per_token.detach().double().sum())   # summed in float64, as stream_nll does
                if collect is not None:
                    if collect.get("features") is None:
                        collect["nll"] = torch.zeros(n, dtype=torch.float64)
                        collect["features"] = feature_store(n, h2.size(-1), collect)
                    collect["nll"][s0:s1] = per_token.detach().double().cpu()
                    collect["features"][s0:s1] = h2.detach().cpu().numpy()
                if lr > 0 and s1 < n:          # (no step after the last segment: nothing left to score)
                    grads = torch.autograd.grad(nll / (s1 - s0), params, allow_unused=True)
                    with torch.no_grad():
                        for p, g, p0 in zip(params, grads, saved):
                            pull = (p0 - p) if decay > 0 else None   # θ₀ − θ, from the weights before the step
                            if g is not None:
                                p.sub_(g, alpha=lr)
                            if pull is not None:
                                p.add_(pull, alpha=decay)
                state = detach_state(new_state)
                if progress is not None:
                    progress(s1 - s0)
    finally:
        if emb_sparse is not None:
            emb.sparse = emb_sparse
        with torch.no_grad():
            for p, p0, flag in zip(params, saved, flags):
                p.copy_(p0)
                p.requires_grad_(flag)
        if was_training:
            model.train()
    return total
