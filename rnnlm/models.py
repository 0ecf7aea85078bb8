"""The language model: embedding -> recurrent stack -> head -> softmax.

Notation (as in the classic sequence-model course): x⟨t⟩ the token at step t, a⟨t⟩ the
hidden state (a⁰ = 0), c⟨t⟩ the LSTM memory cell, ŷ⟨t⟩ = P(x⟨t+1⟩ | x⟨1..t⟩).

Cells (``model.cell``), all sequence-first ``(T, B, ·)``:

* ``rnn_tanh`` / ``rnn_relu`` -- a⟨t⟩ = g(W_aa a⟨t−1⟩ + W_ax x⟨t⟩ + b_a), the fused ``nn.RNN``;
* ``gru``  -- update gate Γu and relevance (reset) gate Γr, the fused ``nn.GRU``:
  c̃⟨t⟩ = tanh(W_c [Γr ⊙ c⟨t−1⟩, x⟨t⟩] + b_c), c⟨t⟩ = Γu ⊙ c̃⟨t⟩ + (1 − Γu) ⊙ c⟨t−1⟩, a⟨t⟩ = c⟨t⟩
  (PyTorch's convention applies Γr after the recurrent matmul and its z weighs the *old* state);
* ``lstm`` -- update/input Γu, forget Γf and output Γo gates, the fused ``nn.LSTM``:
  c⟨t⟩ = Γu ⊙ c̃⟨t⟩ + Γf ⊙ c⟨t−1⟩, a⟨t⟩ = Γo ⊙ tanh(c⟨t⟩);
* ``lstm_peephole`` -- the LSTM whose gates also see the cell (Gers & Schmidhuber 2000),
  see :mod:`rnnlm.peephole`.

Bidirectional (``model.bidirectional``) is done the ELMo way (Peters et al. 2018): a
forward stack reads the text left to right and predicts the next token, a backward stack
reads the reversed text and predicts the previous token; embedding, head and softmax are
shared. Neither direction ever sees the token it predicts (a plain bidirectional RNN
feeding next-token prediction would leak it).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import adaptive_target_log_prob, fp32_linear, linear_cross_entropy

State = Any  # None, a tensor (L, B, H), or an LSTM tuple (h, c) of such tensors


def keep_mask_plan(p: float) -> tuple[int, int, float]:
    """How :class:`Dropout` draws a mask for rate `p`: (bits per element, signed threshold, realised rate).

    Each element gets a uniform `bits`-bit integer, sliced from full 64-bit draws, and is dropped
    when it falls below the threshold, so the realised rate is a multiple of 2^-bits. 16 bits (four
    elements per draw) when that lands within 0.01 % of `p` (0.2 -> 0.19999695, 3e-6 away); 32
    bits otherwise (0.01 -> 2.3e-12 away).
    """
    for bits in (16, 32):
        levels = 1 << bits
        k = round(p * levels)
        if 0 < k < levels and (abs(k / levels - p) <= 1e-4 * p or bits == 32):
            return bits, k - levels // 2, k / levels
    k = min(max(round(p * (1 << 32)), 0), (1 << 32) - 1)
    return 32, k - (1 << 31), k / (1 << 32)


def _sliced_draws(device: torch.device) -> bool:
    """Where Dropout slices 64-bit draws: CPU, whose generator is serial (elsewhere torch.rand is
    parallel and cheap)."""
    return device.type == "cpu"


class Dropout(nn.Module):
    """Inverted dropout, ``nn.Dropout``'s math, with a cheaper mask on CPU.

    On CPU, ``bernoulli_`` and ``torch.rand`` spend one draw of PyTorch's serial generator per
    element; this mask slices four 16-bit uniforms (or two 32-bit ones) out of each full 64-bit
    draw of the same generator (seeding and checkpointed RNG state as before) and compares them
    with a threshold: the draws for a 35x20x200 activation take 0.10 ms instead of 0.30 on this
    project's 2-core CPU. The rate is realised to 2^-16 or better (:func:`keep_mask_plan`), and
    the kept values are scaled by 1 / (1 - realised rate), so the expectation is kept exactly.
    Other devices use ``F.dropout`` (on CUDA one fused kernel; the CUDA generator's state is part
    of the checkpointed RNG state, MPS's is not, so a resumed MPS run draws other masks).
    """

    def __init__(self, p: float, locked: bool = False):
        super().__init__()
        self.p = p
        self.locked = locked  # one mask per sequence for a whole (T, B, D) window: dims 1.. only

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, p: float) -> None:
        self._p = p
        self.bits, self.threshold, self.rate = keep_mask_plan(p) if 0 < p < 1 else (0, 0, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        if self.locked and x.dim() == 3:
            return x * self.mask((1, *x.shape[1:]), x)      # broadcast over the T steps
        if _sliced_draws(x.device):
            return x * self.mask(x.shape, x)
        return F.dropout(x, self.p, training=True)  # elsewhere PyTorch's fused kernel (one launch on CUDA)

    def mask(self, shape, like: torch.Tensor) -> torch.Tensor:
        """A fresh mask of `shape` in `like`'s dtype and device: 0 where dropped, 1 / (1 - rate) where kept."""
        if self.p >= 1:
            return like.new_zeros(shape)
        if _sliced_draws(like.device):
            n = math.prod(shape)
            words = torch.empty(-(-n // (64 // self.bits)), dtype=torch.int64, device=like.device)
            words.random_(-2 ** 63, None)                   # full 64-bit draws
            r = words.view(torch.int16 if self.bits == 16 else torch.int32)[:n].view(shape)
            keep = r >= self.threshold
            return keep.to(like.dtype).mul_(1.0 / (1.0 - self.rate))
        return F.dropout(like.new_ones(shape), self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", locked" if self.locked else "")


_LAYER_FNS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


def run_layerwise(rnn: nn.RNNBase, x: torch.Tensor, state, drop: Dropout, weight_drop: Dropout | None = None):
    """``rnn(x, state)`` for a unidirectional multi-layer ``nn.LSTM``/``GRU``/``RNN`` in training, one
    layer per call with `drop` between layers instead of the module's own ``bernoulli_`` dropout
    (twice as slow on CPU; on CUDA, cuDNN's dropout keeps a random state of its own that a
    checkpoint cannot restore). The same weights, the same fused kernels, the same dropout rate.

    `weight_drop` (DropConnect, AWD-LSTM's weight drop) masks each layer's hidden-to-hidden weight
    ``weight_hh_l{k}`` for this call: the masked copy goes to the same fused kernel, and the
    gradient reaches the kept entries of the parameter, scaled like the forward.

    On CUDA, cuDNN wants each call's weights to start a storage, which in the module's flattened
    buffer only layer 0 does: the layers above are copied into a fresh buffer on each call (a few
    device copies, their gradients routed back) and PyTorch's warning about that is not shown."""
    L, lstm = rnn.num_layers, rnn.mode == "LSTM"
    names = ("weight_ih_l{}", "weight_hh_l{}") + (("bias_ih_l{}", "bias_hh_l{}") if rnn.bias else ())
    B, H = x.size(1), rnn.hidden_size
    if state is None:
        zero = x.new_zeros(L, B, H)
        state = (zero, zero) if lstm else zero
    fn = _LAYER_FNS[rnn.mode]
    hs, cs = [], []
    with warnings.catch_warnings() if x.is_cuda else nullcontext():
        if x.is_cuda:
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
        for k in range(L):
            w = [getattr(rnn, n.format(k)) for n in names]
            if weight_drop is not None:
                w[1] = weight_drop(w[1])
            if lstm:
                x, h, c = fn(x, (state[0][k:k + 1], state[1][k:k + 1]), w, rnn.bias, 1, 0.0, True, False, False)
                cs.append(c)
            else:
                x, h = fn(x, state[k:k + 1], w, rnn.bias, 1, 0.0, True, False, False)
            hs.append(h)
            if k < L - 1:
                x = drop(x)
    return x, ((torch.cat(hs), torch.cat(cs)) if lstm else torch.cat(hs))


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> nn.Module:
    """A recurrent stack of `num_layers` cells with dropout between layers."""
    inter = dropout if num_layers > 1 else 0.0
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden_size, num_layers, nonlinearity=cell[4:], dropout=inter)
    if cell == "gru":
        return nn.GRU(input_size, hidden_size, num_layers, dropout=inter)
    if cell == "lstm":
        return nn.LSTM(input_size, hidden_size, num_layers, dropout=inter)
    if cell == "lstm_peephole":
        from .peephole import PeepholeLSTM
        return PeepholeLSTM(input_size, hidden_size, num_layers, dropout=inter)
    raise ValueError(f"unknown cell {cell!r}")


def auto_cutoffs(vocab_size: int) -> list[int]:
    """Adaptive-softmax clusters for a frequency-sorted vocabulary of `vocab_size` tokens.

    The head keeps the most frequent ~2k words (Grave et al. 2017 use 2k-20k heads for
    10^4-10^6 word vocabularies); tails grow by about 5x each.
    """
    cuts = [c for c in (2000, 10000, 50000, 250000) if c < vocab_size - 1]
    return cuts or [max(1, vocab_size // 2)]


# Training on a GPU: logits (rows x vocabulary) below this many elements go through F.linear +
# F.cross_entropy; larger ones through the fused function, whose memory is one (N, V) buffer.
PLAIN_LOSS_MAX = 1 << 25


def _plain_loss(device: torch.device, n_logits: int) -> bool:
    """Whether training's output layer is PyTorch's linear + cross-entropy (a GPU, fewer than
    PLAIN_LOSS_MAX logits) rather than the fused function."""
    return device.type != "cpu" and n_logits < PLAIN_LOSS_MAX


class RNNLM(nn.Module):
    """A recurrent language model (one direction, or ELMo-style forward + backward).

    >>> from rnnlm.config import ModelConfig
    >>> m = RNNLM(50, ModelConfig(hidden_size=16, embedding_size=8, num_layers=1))
    >>> h, state = m(torch.zeros(7, 3, dtype=torch.long))   # (T, B) ids
    >>> m.log_probs(h).shape                                 # (T, B, V)
    torch.Size([7, 3, 50])
    """

    def __init__(self, vocab_size: int, cfg) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.cell = cfg.cell
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_layers
        self.num_directions = 2 if cfg.bidirectional else 1
        E, H = cfg.embedding_size, cfg.hidden_size
        # Regularisation in training (all of it off in eval): dropout at three sites, each with its
        # own rate or model.dropout's; optionally locked (one mask per sequence and window); embedding
        # dropout of whole word types; DropConnect on the recurrent weights (Merity et al. 2018).
        site = lambda key: cfg.dropout if getattr(cfg, key, None) is None else getattr(cfg, key)  # noqa: E731
        locked = bool(getattr(cfg, "locked_dropout", False))
        self.drop_in = Dropout(site("dropout_input"), locked)
        self.drop_hid = Dropout(site("dropout_hidden"), locked)
        self.drop_out = Dropout(site("dropout_output"), locked)
        self.drop_emb = Dropout(getattr(cfg, "dropout_embedding", 0.0))
        self.drop_w = Dropout(getattr(cfg, "weight_drop", 0.0))
        self.embedding = nn.Embedding(vocab_size, E)
        # One stack per direction; rnns[0] reads left to right, rnns[1] (if any) right to left.
        self.rnns = nn.ModuleList(
            make_rnn(cfg.cell, E, H, cfg.num_layers, self.drop_hid.p) for _ in range(self.num_directions))
        if cfg.cell == "lstm_peephole":  # its own layer loop takes the same dropouts
            for rnn in self.rnns:
                rnn.inter_drop, rnn.weight_drop = self.drop_hid, self.drop_w
        # Deep output: non-recurrent layers on top of a⟨t⟩, no horizontal connections.
        self.head = nn.Sequential(*[m for _ in range(cfg.head_layers) for m in (nn.Linear(H, H), nn.Tanh())])
        out_dim = H
        self.proj: nn.Module | None = None
        if cfg.tie_weights and H != E:
            self.proj = nn.Linear(H, E, bias=False)  # so the tied (V, E) matrix can score H-sized states
            out_dim = E
        self.out_dim = out_dim
        self.adaptive = cfg.softmax == "adaptive"
        if self.adaptive:
            cutoffs = list(cfg.adaptive_cutoffs) if cfg.adaptive_cutoffs else auto_cutoffs(vocab_size)
            kept = [c for c in cutoffs if c < vocab_size - 1] or [max(1, vocab_size // 2)]
            if cfg.adaptive_cutoffs and kept != cutoffs:
                warnings.warn(f"model.adaptive_cutoffs {list(cfg.adaptive_cutoffs)} do not fit a vocabulary of "
                              f"{vocab_size} tokens (each cutoff must be below {vocab_size - 1}); using {kept}",
                              stacklevel=2)
            cutoffs = kept
            self.cutoffs = cutoffs  # the ones in use (the trainer records them in the run's config)
            self.softmax = nn.AdaptiveLogSoftmaxWithLoss(out_dim, vocab_size, cutoffs, div_value=4.0)
            self.decoder = None
        else:
            self.decoder = nn.Linear(out_dim, vocab_size)
            if cfg.tie_weights:
                self.decoder.weight = self.embedding.weight  # (V, E) shared
        self._init_weights(cfg.init_range, getattr(cfg, "forget_bias", 1.0))

    def _init_weights(self, init_range: float | None, forget_bias: float | None) -> None:
        if init_range is not None:
            for p in self.parameters():
                nn.init.uniform_(p, -init_range, init_range)
        if self.cell.startswith("lstm") and forget_bias is not None:
            # Start with Γf ≈ σ(1): remember by default (Gers et al. 2000; Jozefowicz et al. 2015).
            H = self.hidden_size
            with torch.no_grad():
                for rnn in self.rnns:
                    for name, p in rnn.named_parameters():
                        if name.startswith("bias_ih"):
                            p[H:2 * H].fill_(forget_bias)
                        elif name.startswith("bias_hh"):
                            p[H:2 * H].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- recurrent part -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: State = None, direction: int = 0) -> tuple[torch.Tensor, State]:
        """x: (T, B) ids in the reading order of `direction` -> features (T, B, D), new state.

        `direction` 1 is the backward stack; its input is the reversed text.
        """
        h, _, state = self.features(x, state, direction)
        return h, state

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding lookup; in training with model.dropout_embedding, whole word types are dropped:
        one keep/drop draw per vocabulary row, so every occurrence of a dropped token in the window
        reads zeros and the kept ones are scaled by 1 / (1 - rate)."""
        emb = self.embedding(x)
        if self.training and self.drop_emb.p > 0:
            emb = emb * self.drop_emb.mask((self.vocab_size, 1), emb)[x]
        return emb

    def features(self, x: torch.Tensor, state: State = None, direction: int = 0):
        """Like :meth:`forward`, and also the top recurrent layer's outputs before the head and the
        output dropout (what temporal activation regularisation looks at): (h, raw, state)."""
        emb = self.drop_in(self.embed(x))              # (T, B, E)
        rnn = self.rnns[direction]
        if (self.training and type(rnn) in (nn.LSTM, nn.GRU, nn.RNN)
                and (self.drop_w.p > 0 or (self.num_layers > 1 and self.drop_hid.p > 0))):
            out, state = run_layerwise(rnn, emb, state, self.drop_hid, self.drop_w if self.drop_w.p > 0 else None)
        else:
            out, state = rnn(emb, state)               # (T, B, H)
        raw = out
        out = self.head(out)
        if self.proj is not None:
            out = self.proj(out)                       # (T, B, E)
        return self.drop_out(out), raw, state

    # -- output layer ----------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores (..., V); full softmax only."""
        if self.adaptive:
            raise RuntimeError("an adaptive softmax has no single logit matrix; use log_probs")
        return self.decoder(h)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Exact log P(next token) over the whole vocabulary: (..., D) -> (..., V), float32."""
        shape = h.shape[:-1]
        h2 = h.reshape(-1, h.size(-1))
        if self.adaptive:
            lp = self.softmax.log_prob(h2.float())
        else:
            lp = F.log_softmax(self.decoder(h2).float(), dim=-1)
        return lp.reshape(*shape, self.vocab_size)

    def nll(self, h: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood (nats) of targets y (...) given features h (..., D)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        h2 = h.reshape(-1, h.size(-1))
        y2 = y.reshape(-1)
        if self.adaptive:
            # log p of each target; the module's own forward is not autocast-safe on CPU.
            out = adaptive_target_log_prob(self.softmax, h2, y2)
            return -(out.sum() if reduction == "sum" else out.mean()) if reduction != "none" else -out
        if not torch.is_grad_enabled():
            # Evaluation: the plain fp32 log-softmax, exact even where a probability underflows.
            return F.cross_entropy(fp32_linear(h2, self.decoder.weight, self.decoder.bias).float(), y2,
                                   reduction=reduction)
        if _plain_loss(h2.device, h2.size(0) * self.vocab_size):
            # On a GPU a step of this size is bound by kernel launches, not memory traffic, and
            # PyTorch's linear + cross-entropy takes about half the launches of the fused function.
            # The log-softmax in fp32 whatever the autocast dtype.
            return F.cross_entropy(self.decoder(h2).float(), y2, reduction=reduction)
        # Training: fused linear + cross-entropy, far less memory traffic than logits -> log_softmax -> nll.
        return linear_cross_entropy(h2, self.decoder.weight, self.decoder.bias, y2, reduction)


def detach_state(state: State) -> State:
    """Cut the graph at a window boundary (truncated BPTT) while keeping the values."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()




def reset_column(state: State, j: int) -> State:
    """A copy of `state` with batch column `j` set to zero (the zero state of a fresh sequence)."""
    def zeroed(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()  # (L, B, H); the caller's tensor may be saved, or shared with a checkpoint
        t[:, j] = 0
        return t
    if state is None:
        return None
    return tuple(zeroed(s) for s in state) if isinstance(state, tuple) else zeroed(state)


def state_to_list(state: State) -> list[torch.Tensor] | None:
    """A checkpoint-friendly form of a state (tensors in a list)."""
    if state is None:
        return None
    return [s.detach().cpu() for s in state] if isinstance(state, tuple) else [state.detach().cpu()]


def state_from_list(items: list[torch.Tensor] | None, cell: str, device: torch.device) -> State:
    if items is None:
        return None
    items = [t.to(device) for t in items]
    return tuple(items) if cell.startswith("lstm") else items[0]
