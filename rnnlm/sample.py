"""Sampling text from a trained model.

One step of the recurrent stack per new token, the hidden state carried: O(1) work per
token, the prefix is never re-run. At each step the next-token distribution is processed
in this order:

1. ``<unk>`` removed (unless ``allow_unk``): its probability is set to 0 and the rest
   renormalised -- exactly the distribution of re-drawing until a non-UNK token comes up;
2. temperature T: p_i ∝ p_i^(1/T); T = 0 (or ``greedy``) takes the most probable token;
3. top-k (keep the k most probable tokens), then top-p / nucleus (keep the smallest set of
   the most probable tokens whose mass, renormalised after top-k, reaches p);
4. a draw from a generator seeded with ``seed``, so a seed makes output reproducible.

Removing UNK and the temperature commute; top-k and top-p see the distribution without UNK.
A sample ends at ``<eos>`` (not part of the text) or after ``max_length`` tokens, whichever
comes first; the samples of one batch end independently. Bidirectional models sample with
their forward direction.

Speed: going through ``nn.LSTM`` for one step at a time is slow on CPU (its oneDNN path has a
fixed cost per call, measured ~8 ms per layer for 512 units, torch 2.13, more than a hundred
times the step's arithmetic), so the forward stack is stepped by hand on the module's weights:

* ``nn.LSTM`` (float32): each layer is ONE matrix-vector product ``[x; h] @ [W_ih W_hh]^T`` and
  a few pointwise ops. At batch 1 a step is a handful of matrix-vector products, which plain
  ``torch.addmm`` runs on one core at the speed of the memory. Which product computes each
  matrix (the output layer's too) is :func:`_product`'s rule: on CPU, small matrices by one
  core's ``addmm`` (:class:`_Addmm`); large ones at batch 1 by :class:`_Gemv`, row blocks of the
  matrix computed by one ``baddbmm`` that PyTorch parallelises over the blocks; large ones at
  larger batches by oneDNN's inner product on a weight packed once (:class:`_Packed`; a 2048x1024
  product at batch 4 on a 2-core Zen 4 EPYC: 101 µs against 282 for the row blocks); on other
  devices one ``baddbmm``.
* ``nn.GRU``: two products per layer (input and hidden kept apart for the candidate
  gate); ``nn.RNN``: one, like the LSTM. Stacks in another dtype use the fused cell functions
  (``torch.gru_cell`` & co.).
* Either way, for small vocabularies the first layer's input projection of every token is
  precomputed (a (V, G·H) table), which removes one matrix-vector product per step.
* The peephole LSTM (float32) is stepped like the LSTM, its gates in their own order with the
  peephole terms added (:class:`_PeepholeStack`). Other recurrent modules go through
  ``model(...)`` one step at a time.
* An adaptive softmax's head and tails are products of the same kinds (:class:`_AdaptiveScores`).
* ``precision="bf16"`` (``rnnlm sample --precision bf16``): matrices of 2^20 weights or more (and
  256 columns or more) are read in bfloat16, half the bytes (:class:`_BF16`), products accumulated
  in float32, their outputs rounded to bfloat16 as under autocast; biases, states, the cells'
  arithmetic and the draws stay float32.

See docs/SAMPLING.md for the measured figures.
"""

from __future__ import annotations

import bisect
import itertools
import math
import secrets
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .errors import UsageError
from .ops import _packed_weights_ok, autocast_available, float64_device, linear_onednn, to_float64
from .peephole import PeepholeLSTM
from .text import EOS, EOS_ID, UNK, UNK_ID, Tokenizer, Vocab

NEG_INF = float("-inf")
# The sampler's precisions: float32 throughout, or the large products in bfloat16 (class _BF16).
PRECISIONS = ("fp32", "bf16")
# Precompute the first layer's input projection when the (V, G·H) table has at most this
# many entries (8 MB of float32): every character vocabulary, not a 10k-word one.
_TABLE_MAX_ENTRIES = 1 << 21
# Contexts up to this many tokens are fed one step at a time; longer ones in one model call.
_STEP_PRIME_MAX = 64


@dataclass
class Sample:
    text: str           # prime + generated text
    generated: str      # the generated continuation alone
    tokens: int         # generated tokens (EOS not counted)
    stop: str           # "eos" or "length"

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stop": self.stop, "generated": self.generated}


# -- the distribution -------------------------------------------------------------------------

def _truncate(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p on unnormalised log-scores (B, V): removed entries become -inf.

    Exactly min(k, V) tokens survive top-k (a tie at the k-th value is broken arbitrarily). Top-p
    keeps, in order of probability, every token whose better tokens hold less than p of the
    mass (renormalised after top-k): the smallest set whose mass reaches p.
    """
    V = scores.size(-1)
    if 0 < top_k < V:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(scores, top_k, dim=-1).indices, True)
        scores = scores.masked_fill(~keep, NEG_INF)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(to_float64(sorted_scores), dim=-1)   # (on the CPU for MPS)
        mass_before = probs.cumsum(-1) - probs          # mass of the strictly better tokens
        drop_sorted = (mass_before >= top_p).to(scores.device)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, NEG_INF)
    return scores


def filter_log_probs(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     allow_unk: bool = False) -> torch.Tensor:
    """The log-probabilities actually sampled from, given the model's (B, V) log-probabilities.

    Applies UNK removal, temperature, top-k and top-p in that order (the module docstring
    says how); removed tokens get -inf and the rest is renormalised. ``temperature=0`` gives
    the greedy distribution: all the mass on the most probable (non-UNK) token.
    """
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UsageError(f"temperature must be a number >= 0, got {temperature}")
    scores = logp.float().clone()
    if not allow_unk:
        scores[..., UNK_ID] = NEG_INF
    if temperature == 0:
        greedy = torch.full_like(scores, NEG_INF)
        return greedy.scatter_(-1, scores.argmax(-1, keepdim=True), 0.0)
    if temperature != 1.0:
        scores = scores / temperature
    scores = _truncate(scores, top_k, top_p)
    return torch.log_softmax(scores, dim=-1)


# -- one token at a time ------------------------------------------------------------------------

def _parts(device: torch.device) -> int:
    """Row blocks per matrix-vector product: one per intra-op thread on CPU, one on accelerators."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


class _Gemv:
    """``x @ W^T + b`` for a few rows x (B, K), as `parts` row blocks of W computed by one ``baddbmm``.

    PyTorch computes a (1, K) x (K, N) product on one core, at the speed of the memory; a
    batched product over P blocks of N/P rows each runs the blocks on P threads. W is copied
    once, as (P, K, n) blocks (N padded with zero rows up to P·n, the padding sliced off the
    result). The bias may be given per call, as (P, B or 1, n) from :meth:`split`. Used for
    large matrices at batch 1 on CPU, at every batch where oneDNN is off, and on other devices
    (one block): see :func:`_product`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: int):
        N, K = weight.shape
        self.N, self.P = N, max(1, min(parts, N))
        self.n = -(-N // self.P)
        w = self._pad(weight.detach().float())
        self.w = w.view(self.P, self.n, K).transpose(1, 2).contiguous()       # (P, K, n)
        self.b = self.split(bias if bias is not None else weight.new_zeros(N))

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        extra = self.P * self.n - self.N
        return torch.cat([rows, rows.new_zeros(extra, *rows.shape[1:])]) if extra else rows

    def split(self, bias: torch.Tensor) -> torch.Tensor:
        """A bias (N,) as (P, 1, n); or per-row biases (M, N) as (M, P, n) for a row lookup."""
        if bias.dim() == 1:
            return self._pad(bias.detach().float()).view(self.P, 1, self.n)
        return self._pad(bias.detach().float().t()).t().reshape(-1, self.P, self.n)

    @staticmethod
    def rows(split: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The per-row biases of tokens `ids` from a :meth:`split` table, as this product takes them."""
        return split.index_select(0, ids).transpose(0, 1)                      # (P, B, n)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, K = x.shape
        out = torch.baddbmm(self.b if bias is None else bias, x.unsqueeze(0).expand(self.P, B, K), self.w)
        out = out.view(B, -1) if B == 1 else out.transpose(0, 1).reshape(B, -1)   # (B, P·n)
        return out[:, :self.N] if self.P * self.n != self.N else out

    def into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """``out[:] = self(x, bias)`` for a contiguous float32 `out` (B, N): at batch 1 without padding
        the batched product writes straight into it."""
        if x.size(0) == 1 and self.P * self.n == self.N:
            torch.baddbmm(self.b if bias is None else bias, x.unsqueeze(0).expand(self.P, 1, x.size(1)), self.w,
                          out=out.view(self.P, 1, self.n))
        else:
            out.copy_(self(x, bias))

    def bound(self, x: torch.Tensor, out: torch.Tensor) -> Callable:
        """``into(out, x, bias)`` as a callable of the bias alone, for an `x` and `out` that stay the same
        tensors (buffers read and written in place at each call): at batch 1 the views the batched
        product takes are made here, once."""
        if x.size(0) != 1 or self.P * self.n != self.N:
            return lambda bias=None: self.into(out, x, bias)
        xs, w, b, o = x.unsqueeze(0).expand(self.P, 1, x.size(1)), self.w, self.b, out.view(self.P, 1, self.n)
        return lambda bias=None: torch.baddbmm(b if bias is None else bias, xs, w, out=o)

    @staticmethod
    def rows_into(split: torch.Tensor, batch: int) -> Callable:
        """:meth:`rows` as a callable of the tokens (`batch` of them), into a buffer of its own."""
        buf = split.new_empty(batch, *split.shape[1:])
        t = buf.transpose(0, 1)

        def rows(ids: torch.Tensor) -> torch.Tensor:
            torch.index_select(split, 0, ids, out=buf)
            return t
        return rows


class _Addmm:
    """``x @ W^T + b`` by one ``torch.addmm`` (one core): for small matrices, where a threaded
    call's fixed cost is more than the whole product. W and b are copied (never views of the
    model's parameters, so a prepared stepper is stale as a whole, never half-updated).
    A bias given per call is (N,), or (B, N) per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.N = weight.size(0)
        self.wt = weight.detach().float().t().clone()
        self.b = self.split(bias if bias is not None else weight.new_zeros(self.N))

    @staticmethod
    def split(bias: torch.Tensor) -> torch.Tensor:
        return bias.detach().float().clone(memory_format=torch.contiguous_format)

    @staticmethod
    def rows(split: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return split.index_select(0, ids)                                       # (B, N)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.addmm(self.b if bias is None else bias, x, self.wt)

    def into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """``out[:] = self(x, bias)`` for a contiguous float32 `out` (B, N), without a new tensor where
        the product can write into `out` itself (this class: ``addmm(out=)``)."""
        torch.addmm(self.b if bias is None else bias, x, self.wt, out=out)

    def bound(self, x: torch.Tensor, out: torch.Tensor) -> Callable:
        """``into(out, x, bias)`` as a callable of the bias alone (see :meth:`_Gemv.bound`)."""
        return lambda bias=None: self.into(out, x, bias)

    @staticmethod
    def rows_into(split: torch.Tensor, batch: int) -> Callable:
        """:meth:`rows` as a callable of the tokens (`batch` of them), into a buffer of its own."""
        buf = split.new_empty(batch, split.size(1))
        return lambda ids: torch.index_select(split, 0, ids, out=buf)


class _Packed(_Addmm):
    """``x @ W^T + b`` by oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``) on a copy
    of W reordered once into its blocked layout: float32 on CPU, all intra-op threads. At batch 1
    on a Zen 4 EPYC (2 threads) a 2048x1024 product takes 75 µs against 106 for :class:`_Gemv`'s
    row blocks and 151 for ``addmm``, and a 10,000x512 one 253 µs against 1,694 for ``addmm``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.N, K = weight.shape
        w = weight.detach().float().contiguous()
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.b = self.split(bias if bias is not None else weight.new_zeros(self.N))
        # checked once on this very matrix, with its bias and a per-row bias (2 rows): a oneDNN that
        # refuses or miscomputes it is an error here, where _product falls back to the row blocks
        g = torch.Generator().manual_seed(0)
        x, rows = torch.randn(2, K, generator=g), torch.randn(2, self.N, generator=g)
        if not (torch.allclose(self(x), torch.addmm(self.b, x, w.t()), rtol=1e-4, atol=1e-4)
                and torch.allclose(self(x, rows), torch.addmm(rows, x, w.t()), rtol=1e-4, atol=1e-4)):
            raise RuntimeError("oneDNN's packed product does not match addmm for this matrix")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.b if bias is None else bias
        if b.dim() == 2:                      # per-row biases: one row is the op's own bias, more are added
            if b.size(0) != 1:
                return linear_onednn(x, self.w).add_(b)
            b = b.view(-1)
        return linear_onednn(x, self.w, b)

    def into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        out.copy_(self(x, bias))


class _BF16(_Addmm):
    """``x @ W^T + b`` with W stored in bfloat16 (half the bytes of float32): x is rounded to
    bfloat16, the product accumulates in float32 and comes out rounded to bfloat16 -- the
    numerics of a linear layer under bf16 autocast -- and the bias, kept in float32, is added in
    float32, so the result is float32. On CPU the weight is packed once for oneDNN's inner
    product (:func:`_packed_weights_ok` must hold); elsewhere it is a plain bfloat16 tensor for
    the device's matmul. A matrix-vector product reads every weight once per token, so at batch 1
    this is the speed of the memory halved: a 2048x1024 product on a Zen 4 EPYC (2 threads) takes
    ~52 µs against ~82 for the float32 packed one. Checked once on its own matrix against float32
    arithmetic on the rounded operands (within bfloat16's rounding of the output)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.N, K = weight.shape
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.packed = w.device.type == "cpu"
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, None) if self.packed else w
        self.b = self.split(bias if bias is not None else weight.new_zeros(self.N))
        g = torch.Generator(device=w.device).manual_seed(0)
        x = torch.randn(2, K, generator=g, device=w.device)
        rows = torch.randn(2, self.N, generator=g, device=w.device)
        exact = x.to(torch.bfloat16).float() @ w.float().t()
        scale = float(exact.abs().max()) + 1e-30
        for extra in (None, rows):
            got = self(x, extra)
            want = exact + (self.b if extra is None else extra)
            # the product is rounded to bfloat16 once: a relative error of at most 2^-8 per entry
            if got.dtype != torch.float32 or not torch.allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * scale):
                raise RuntimeError("the bfloat16 product does not match float32 arithmetic for this matrix")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.add(self._bf16(x), self.b if bias is None else bias)     # bf16 + fp32 -> fp32

    def _bf16(self, x: torch.Tensor) -> torch.Tensor:
        x = x.bfloat16()
        return linear_onednn(x, self.w) if self.packed else torch.nn.functional.linear(x, self.w)

    def into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        torch.add(self._bf16(x), self.b if bias is None else bias, out=out)


# float32 CPU matrices with at least this many weights get a threaded product (row blocks at
# batch 1, oneDNN at larger batches: :func:`_product`), smaller ones one core's addmm. Measured
# at batch 1 on a Zen 4 EPYC, 2 threads (µs, oneDNN / row blocks / addmm): 512x256 23 / 14 / 12; 512x512 26 / 19 / 24;
# 1024x512 36 / 39 / 47; 2048x512 50 / 68 / 95.
_PACK_MIN_ENTRIES = 1 << 18


# With precision="bf16", matrices of at least this many weights are read in bfloat16 (_BF16). Below
# it (4 MB of float32) the matrix stays in the caches between steps and the float32 products are as
# fast or faster. Measured at batch 1 on a Zen 4 EPYC, 2 threads (µs, float32 / bfloat16):
# 800x400 20 / 30; 10000x200 85 / 75; 2048x512 57 / 34; 2048x1024 117 / 66; 10000x512 237 / 115.
_BF16_MIN_ENTRIES = 1 << 20
# ... and at least this many columns: oneDNN's bfloat16 product of a narrow matrix (10000x200) gave
# fewer tokens a second in the generation loop than float32 (PTB 2x200 LSTM: 3,127 against 3,365).
_BF16_MIN_COLUMNS = 256


def _packs(device: torch.device, batch: int) -> bool:
    """Whether :func:`_product` gives large matrices to oneDNN (:class:`_Packed`) here."""
    return device.type == "cpu" and batch > 1 and _packed_weights_ok()


def _product(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device, batch: int = 1,
             precision: str = "fp32"):
    """The fastest kind of product for `weight` (N, K) at `batch` rows on `device`.

    With ``precision="bf16"`` a matrix of at least ``_BF16_MIN_ENTRIES`` weights and
    ``_BF16_MIN_COLUMNS`` columns is a :class:`_BF16` product (on CPU only where oneDNN's packed
    product passes its start-up check: PyTorch's plain bfloat16 matmul is slower there than float32
    at batch 1); smaller or narrower matrices, which gain nothing, and a matrix failing its own
    check take the float32 rule. In float32, on CPU:
    under ``_PACK_MIN_ENTRIES`` weights an :class:`_Addmm`; larger ones at batch 1 :class:`_Gemv`'s
    row blocks, at larger batches a :class:`_Packed` one where oneDNN passes its start-up check
    (:func:`rnnlm.ops._packed_weights_ok`; ``RNNLM_ONEDNN_MATMUL=0`` turns it off) and its check
    on the matrix itself, else row blocks. On other devices a :class:`_Gemv` of one block.

    Why row blocks at batch 1: alone, oneDNN's product is faster (a 2048x1024 one in 75 µs against
    106), but in the generation loop, between the single-threaded steps of the sampler, the row
    blocks gave more tokens a second (Zen 4, 2 threads, same process, alternating: 4,431 against
    3,697 at a 100-token vocabulary). From batch 2 on oneDNN wins by far (6,645 against 5,355 at
    batch 2, 11,638 against 6,516 at batch 4).
    """
    if precision == "bf16" and weight.numel() >= _BF16_MIN_ENTRIES and weight.size(1) >= _BF16_MIN_COLUMNS and (
            device.type != "cpu" or _packed_weights_ok()):
        try:
            return _BF16(weight, bias)
        except RuntimeError:
            pass
    if device.type == "cpu":
        if weight.numel() < _PACK_MIN_ENTRIES:
            return _Addmm(weight, bias)
        if _packs(device, batch):
            try:
                return _Packed(weight, bias)
            except RuntimeError:
                pass
    return _Gemv(weight, bias, _parts(device))


def _joint_gemvs(layers: list[tuple[torch.Tensor, ...]], table: torch.Tensor | None, make: Callable,
                 rows: torch.Tensor | None = None) -> tuple[list, torch.Tensor | None]:
    """Per layer one product (``make(weight, bias)``, :func:`_product`) over ``[x; h]`` with ``[W_ih W_hh]`` and bias b_ih + b_hh, its
    output rows in `rows` order (all, in order, if None). With a token `table` (V, G·H) of layer 0's
    input projections, layer 0 multiplies h alone and the table plus b_hh comes back split as
    per-token biases in the product's layout (:meth:`_Gemv.split`)."""
    gemvs, split_table = [], None
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        r = slice(None) if rows is None else rows.to(w_hh.device)
        if k == 0 and table is not None:
            g = make(w_hh[r], None)
            split_table = g.split((table + b_hh)[:, r])
        else:
            g = make(torch.cat([w_ih, w_hh], 1)[r], (b_ih + b_hh)[r])
        gemvs.append(g)
    return gemvs, split_table


def _side_by_side(hs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Copies of every layer's h (each (B, H)) side by side in one float32 (B, L·H) tensor: that
    tensor and its L views, in order. Layer k's input ``[h_{k-1}; h_k]`` is then a slice of it
    (:func:`_stack_input`)."""
    B, H = hs[0].shape
    both = hs[0].new_empty(B, len(hs) * H, dtype=torch.float32)
    views = [both[:, k * H:(k + 1) * H] for k in range(len(hs))]
    for v, h in zip(views, hs):
        v.copy_(h)
    return both, views


def _stack_input(both: torch.Tensor, k: int, H: int, table: torch.Tensor | None) -> torch.Tensor | None:
    """What layer k's :func:`_joint_gemvs` product multiplies, as a view of :func:`_side_by_side`'s
    tensor: h_0 for layer 0 with a token table, ``[h_{k-1}; h_k]`` from layer 1 on; None for layer 0
    without a table (its input joins the embedded token and h_0 at each step)."""
    if k == 0:
        return both[:, :H] if table is not None else None
    return both[:, (k - 1) * H:(k + 1) * H]


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32, copy=True, memory_format=torch.contiguous_format)


class _Buffered:
    """A stack that steps in buffers of its own. Handed a state list it has not seen (a new sample,
    another batch size, a state from outside), it copies the state into new buffers and replaces
    the list's items by views of them (:meth:`_bind`); every step then updates those in place,
    with the products writing into preallocated outputs (:meth:`_Gemv.into` & co.). At batch 1
    each operation costs more than its arithmetic, so fewer of them a token is what counts
    (docs/SAMPLING.md "Fewer operations a token")."""

    _state: list | None = None

    def _bind(self, state: list) -> None:
        raise NotImplementedError

    def _bound(self, state: list) -> None:
        if state is not self._state:
            self._bind(state)
            self._state = state

    def _cells(self, state: list) -> list[tuple]:
        """For a state of (h, c) per layer (the LSTMs, one :func:`_joint_gemvs` product per layer): per
        layer its product as a callable of (embedded token, tokens) that fills a (B, 4H) gate buffer
        (:meth:`_product_into`), h (a view of :func:`_side_by_side`'s tensor), its own copy of c, the
        gate buffer and its four (B, H) blocks in row order; the state's items become (h, c)."""
        H = self.H
        both, views = _side_by_side([h for h, _ in state])
        out = []
        for k, (g, h, (_, c)) in enumerate(zip(self.gemvs, views, state)):
            c = _own_copy(c)
            gates = h.new_empty(h.size(0), 4 * H)
            out.append((self._product_into(g, k, _stack_input(both, k, H, self.table), h, gates), h, c, gates,
                        gates.view(-1, 4, H).unbind(1)))
            state[k] = (h, c)
        return out

    def _product_into(self, g, k: int, inp: torch.Tensor | None, h: torch.Tensor, out: torch.Tensor) -> Callable:
        """Layer k's :func:`_joint_gemvs` product into `out` as a callable of (embedded token, tokens):
        over its input slice `inp` (:meth:`_Gemv.bound`, views made once), with the token's table row as
        the bias for layer 0 with a table (looked up into a buffer), or over ``[x; h]`` for layer 0
        without one."""
        if inp is None:
            return lambda x, ids: g.into(out, torch.cat([x, h], 1))
        run = g.bound(inp, out)
        if k:
            return lambda x, ids: run()
        rows = g.rows_into(self.table, h.size(0))
        return lambda x, ids: run(rows(ids))


class _LSTMStack(_Buffered):
    """One step of a unidirectional float32 ``nn.LSTM``, one :func:`_product` per layer.

    Layer k computes the gates as ``[x; h] @ [W_ih W_hh]^T + (b_ih + b_hh)`` in one product, with
    the gate rows reordered (i, f, o, g) so that one ``sigmoid_`` and one ``tanh_`` cover them.
    With a `table` (V, 4H) of layer 0's input projections of every token, layer 0 multiplies h
    alone and takes the token's row of the table as its bias. Equal to ``torch.lstm_cell`` up to
    float rounding (the products are summed in another order).

    Buffers (:class:`_Buffered`): every layer's h side by side (:func:`_side_by_side`, so layer k's
    input needs no ``cat``), each layer's c, and each layer's gates, with their views made once;
    the cell works in place. At batch 1 with a 2x512 model this is a third fewer operations a token
    than fresh tensors each step: ~155 instead of ~190 µs a step in bf16, ~210 instead of ~240 in
    float32 (Zen 4 EPYC, 2 threads).
    """

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], table: torch.Tensor | None, make: Callable):
        H = layers[0][1].size(1)
        self.H = H
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        self.gemvs, self.table = _joint_gemvs(layers, table, make, order)

    def _bind(self, state: list) -> None:
        # gate blocks in row order: i, f, o, g
        self._layers = [(run, gates[:, :3 * self.H], *ifog, h, c) for run, h, c, gates, ifog in self._cells(state)]

    def step(self, x: torch.Tensor, ids: torch.Tensor, state: list) -> None:
        """Advance `state` (a list of (h, c) per layer, each (B, H)) in place by one token.

        `x` is the embedded token (B, E), unused when layer 0 has a table; `ids` are the tokens.
        """
        self._bound(state)
        for run, ifo, i, f, o, gg, h, c in self._layers:
            run(x, ids)
            ifo.sigmoid_()
            gg.tanh_()
            c.mul_(f).addcmul_(i, gg)
            torch.tanh(c, out=h).mul_(o)


class _GRUStack(_Buffered):
    """One step of a unidirectional float32 ``nn.GRU``: per layer, W_ih·x + b_ih and W_hh·h + b_hh as
    two :func:`_product` products (kept apart: the candidate gate needs r ⊙ (W_hn·h + b_hn)), then
    r, z = σ(·), n = tanh(i_n + r ⊙ h_n), h' = n + z ⊙ (h − n). Layer 0 looks its input product up
    in the token `table` when there is one. Buffers (:class:`_Buffered`): each layer's h, both
    products' outputs, r and z, n."""

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], table: torch.Tensor | None, make: Callable):
        self.H = layers[0][1].size(1)
        self.table = table
        self.ih = [None if (k == 0 and table is not None) else make(w_ih, b_ih)
                   for k, (w_ih, _, b_ih, _) in enumerate(layers)]
        self.hh = [make(w_hh, b_hh) for (_, w_hh, _, b_hh) in layers]

    def _bind(self, state: list) -> None:
        H = self.H
        self._layers = []
        below = None                                                  # the h of the layer below
        for k, (ih, hh, h) in enumerate(zip(self.ih, self.hh, state)):
            h = _own_copy(h)
            gi, gh, rz, n = (h.new_empty(h.size(0), w) for w in (3 * H, 3 * H, 2 * H, H))
            self._layers.append((self._input_into(ih, below, gi), hh.bound(h, gh), gi[:, :2 * H], gh[:, :2 * H],
                                 gi[:, 2 * H:], gh[:, 2 * H:], rz, rz[:, :H], rz[:, H:], n, h))
            state[k] = below = h

    def _input_into(self, ih, below: torch.Tensor | None, gi: torch.Tensor) -> Callable:
        """The layer's input product into `gi` as a callable of (embedded token, tokens): the token's
        row of the table (layer 0 with a table), over the embedded token (layer 0 without one), or
        over the layer below's h (:meth:`_Gemv.bound`)."""
        if ih is None:
            table = self.table
            return lambda x, ids: torch.index_select(table, 0, ids, out=gi)
        if below is None:
            return lambda x, ids: ih.into(gi, x)
        run = ih.bound(below, gi)
        return lambda x, ids: run()

    def step(self, x: torch.Tensor, ids: torch.Tensor, state: list) -> None:
        self._bound(state)
        for ih, hh, gi_rz, gh_rz, gi_n, gh_n, rz, r, z, n, h in self._layers:
            ih(x, ids)
            hh()
            torch.add(gi_rz, gh_rz, out=rz).sigmoid_()
            torch.addcmul(gi_n, r, gh_n, out=n).tanh_()
            torch.addcmul(n, z, h.sub_(n), out=h)


class _RNNStack:
    """One step of a unidirectional float32 ``nn.RNN`` (tanh or relu): per layer one :func:`_product`
    over ``[x; h]`` with ``[W_ih W_hh]`` (over h alone, with the token's table row as the bias, for
    layer 0 when there is a table). Fresh tensors at each step: buffers as for the other cells
    (:class:`_Buffered`) measured no faster at batch 1 and slower at batch 4 (2x512, Zen 4 EPYC:
    ~19,500 against ~21,400 tokens/s greedy at a 100-token vocabulary), where a layer is only a
    product and its activation."""

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], table: torch.Tensor | None, make: Callable,
                 relu: bool):
        self.act = torch.relu_ if relu else torch.tanh_
        self.gemvs, self.table = _joint_gemvs(layers, table, make)

    def step(self, x: torch.Tensor, ids: torch.Tensor, state: list) -> None:
        for k, g in enumerate(self.gemvs):
            h = state[k]
            if k == 0 and self.table is not None:
                pre = g(h, g.rows(self.table, ids))
            else:
                pre = g(torch.cat([x, h], 1))
            state[k] = x = self.act(pre)


class _PeepholeStack(_Buffered):
    """One step of a float32 :class:`~rnnlm.peephole.PeepholeLSTM`: per layer one :func:`_product`
    over ``[x; h]`` with ``[W_ih W_hh]`` and bias b_ih + b_hh (over h alone, with the token's table
    row as the bias, for layer 0 when there is a table), gate blocks i, f, g, o, then
    Γi, Γf = σ(z + p ⊙ c), c' = Γf ⊙ c + Γi ⊙ tanh(z_g), Γo = σ(z_o + p_o ⊙ c'), h' = Γo ⊙ tanh(c')
    -- the recurrence of :class:`~rnnlm.peephole._PeepholeLayer`. Buffers (:class:`_Buffered`) as
    for the LSTM."""

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], peepholes: list[tuple[torch.Tensor, ...]],
                 table: torch.Tensor | None, make: Callable):
        self.H = layers[0][1].size(1)
        self.gemvs, self.table = _joint_gemvs(layers, table, make)
        self.p_if = [torch.stack((p_i, p_f)).detach().float().clone() for p_i, p_f, _ in peepholes]   # (2, H)
        self.p_o = [p_o.detach().float().clone() for _, _, p_o in peepholes]

    def _bind(self, state: list) -> None:
        # gate blocks in row order: i, f, g, o; Γi and Γf as one (B, 2, H) view, c as (B, 1, H)
        self._layers = [(run, z[:, :2 * self.H].view(-1, 2, self.H), c.unsqueeze(1), *ifgo, h, c, p_if, p_o)
                        for (run, h, c, z, ifgo), p_if, p_o in zip(self._cells(state), self.p_if, self.p_o)]

    def step(self, x: torch.Tensor, ids: torch.Tensor, state: list) -> None:
        self._bound(state)
        for run, z_if, c_1, i, f, gg, o, h, c, p_if, p_o in self._layers:
            run(x, ids)
            z_if.addcmul_(p_if, c_1).sigmoid_()                          # Γi, Γf see the old c
            gg.tanh_()
            c.mul_(f).addcmul_(i, gg)
            o.addcmul_(p_o, c).sigmoid_()                               # Γo sees the new c
            torch.tanh(c, out=h).mul_(o)


class _AdaptiveScores:
    """Full next-token log-probabilities (B, V) of an ``nn.AdaptiveLogSoftmaxWithLoss`` from
    features (B, D), every matrix a :func:`_product`: the head's log-softmax gives the shortlist's
    log-probabilities and each cluster's; a cluster's tokens get its log-probability plus their
    log-softmax within the cluster (its two-matrix tail). The module's ``log_prob`` computes the
    same through ``nn.Linear``, whose single-row products run on one core (WikiText-2's 2002x400
    head: 75 µs against 45 for the row blocks, Zen 4, 2 threads)."""

    def __init__(self, asm: nn.AdaptiveLogSoftmaxWithLoss, make: Callable):
        self.V, self.shortlist = asm.n_classes, asm.shortlist_size
        self.bounds = list(zip(asm.cutoffs[:-1], asm.cutoffs[1:]))
        self.head = make(asm.head.weight, asm.head.bias)
        self.tails = [(make(t[0].weight, t[0].bias), make(t[1].weight, t[1].bias)) for t in asm.tail]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        head = torch.log_softmax(self.head(h), -1)                                  # (B, shortlist + clusters)
        out = h.new_empty(h.size(0), self.V)
        out[:, :self.shortlist] = head[:, :self.shortlist]
        for i, ((a, b), (proj, cls)) in enumerate(zip(self.bounds, self.tails)):
            c = self.shortlist + i
            torch.add(torch.log_softmax(cls(proj(h)), -1), head[:, c:c + 1], out=out[:, a:b])
        return out


_CELLS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell,
          "RNN_RELU": torch.rnn_relu_cell}


class _Stepper:
    """Feeds one token per sample to the forward stack and returns next-token scores.

    ``start(context)`` runs the context (T,) through the model once and broadcasts the state
    to the batch; ``scores()`` gives (B, V) unnormalised log-scores (logits, or log-probs for
    an adaptive softmax) for the next token; ``advance(ids)`` feeds ids (B,). `batch` is the
    batch it is prepared for (the kind of each product depends on it, see :func:`_product`);
    any batch works.
    """

    def __init__(self, model, device: torch.device, batch: int = 1, precision: str = "fp32"):
        self.model = model
        self.device = device
        self.batch = batch
        self.precision = precision
        # decided once: the model's own recurrent module (where it is not stepped by hand) under bf16
        # autocast, where PyTorch has autocast for the device
        self._bf16_autocast = precision == "bf16" and autocast_available(device.type)

        def make(weight: torch.Tensor, bias: torch.Tensor | None):
            return _product(weight, bias, device, batch, precision)

        rnn = model.rnns[0]
        # the peephole LSTM only as a float32 stack: the fused cells below have no peepholes
        peephole = (type(rnn) is PeepholeLSTM and rnn.bias
                    and all(p.dtype == torch.float32 for p in rnn.parameters()))
        self.fused = peephole or (type(rnn) in (nn.LSTM, nn.GRU, nn.RNN) and rnn.bias and not rnn.bidirectional
                                  and not rnn.batch_first and getattr(rnn, "proj_size", 0) == 0
                                  and rnn.mode in _CELLS)
        self.h: torch.Tensor | None = None  # (B, D) features of the last step
        self.state = None
        self.mask_unk = False
        if self.fused:
            self.cell = _CELLS["LSTM" if peephole else rnn.mode]   # (for the token table's check)
            self.lstm = peephole or rnn.mode == "LSTM"
            L = rnn.num_layers
            self.weights = [(getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}"),
                             getattr(rnn, f"bias_ih_l{k}"), getattr(rnn, f"bias_hh_l{k}")) for k in range(L)]
            self.table = self._input_table()
            w_ih = self.weights[0][0]
            self._no_input = [w_ih.new_empty(1, 0), w_ih.new_empty(w_ih.size(0), 0)]  # (B, 0), (G·H, 0)
        self.stack = None
        if peephole:
            peepholes = [tuple(getattr(rnn, f"weight_c{gate}_l{k}") for gate in "ifo") for k in range(L)]
            self.stack = _PeepholeStack(self.weights, peepholes, self.table, make)
        elif self.fused and all(w.dtype == torch.float32 for layer in self.weights for w in layer):
            if rnn.mode == "LSTM":
                self.stack = _LSTMStack(self.weights, self.table, make)
            elif rnn.mode == "GRU":
                self.stack = _GRUStack(self.weights, self.table, make)
            else:
                self.stack = _RNNStack(self.weights, self.table, make, relu=rnn.mode == "RNN_RELU")
        dec = None if model.adaptive else model.decoder
        self.decoder = make(dec.weight, None) if dec is not None else None
        # an adaptive softmax through the same kinds of products (float32 in, float32 out)
        self.adaptive = _AdaptiveScores(model.softmax, make) if model.adaptive else None
        self.dec_bias: torch.Tensor | None = None

    def _input_table(self) -> torch.Tensor | None:
        """Layer 0's input projection W_ih·emb(v) + b_ih of every token v: (V, G·H), or None.

        Fed to the cell as a per-row bias with an empty input, so the cell skips that
        matrix-vector product; checked once against the plain cell call.
        """
        w_ih, w_hh, b_ih, b_hh = self.weights[0]
        emb = self.model.embedding.weight
        if emb.size(0) * w_ih.size(0) > _TABLE_MAX_ENTRIES:
            return None
        table = torch.addmm(b_ih, emb, w_ih.t())                      # (V, G·H)
        probe = torch.arange(min(3, emb.size(0)), device=emb.device)
        hx = torch.randn(probe.numel(), w_hh.size(1), device=emb.device, generator=torch.Generator(
            device=emb.device).manual_seed(0)) * 0.5
        hx = (hx, hx.clone()) if self.lstm else hx
        try:
            ref = self.cell(emb[probe], hx, w_ih, w_hh, b_ih, b_hh)
            got = self.cell(emb.new_empty(probe.numel(), 0), hx, emb.new_empty(w_ih.size(0), 0), w_hh,
                            table[probe], b_hh)
        except RuntimeError:
            return None
        ref, got = (ref[0], got[0]) if self.lstm else (ref, got)
        return table if torch.allclose(ref, got, rtol=1e-4, atol=1e-5) else None

    def start(self, context: list[int], batch: int, mask_unk: bool = False) -> None:
        """Run the context (start context <eos> first) and broadcast the state to `batch` samples.

        With `mask_unk`, scores() gives <unk> a score of -inf (folded into the output bias).
        """
        m = self.model
        self.dec_bias = None
        if self.decoder is not None:
            bias = m.decoder.bias.detach().float().clone()
            if mask_unk:
                bias[UNK_ID] = NEG_INF
            self.dec_bias = self.decoder.split(bias)
        self.mask_unk = mask_unk
        if self.fused and len(context) <= _STEP_PRIME_MAX:
            # Short contexts go through the cells too: no per-call setup cost of nn.LSTM.
            ids = torch.tensor(context, dtype=torch.long, device=self.device)
            H = self.weights[0][1].size(1)
            zero = m.embedding.weight.new_zeros(1, H)
            self.state = [(zero, zero) if self.lstm else zero for _ in self.weights]
            for i in range(len(context)):
                self.advance(ids[i:i + 1])
            if batch > 1:
                self.h = self.h.expand(batch, -1).contiguous()
                self.state = [tuple(t.expand(batch, -1).contiguous() for t in s) if self.lstm
                              else s.expand(batch, -1).contiguous() for s in self.state]
        else:
            x = torch.tensor(context, dtype=torch.long, device=self.device).unsqueeze(1)  # (T, 1)
            # (the fused stacks start from a float32 state in any precision)
            with self._autocast() if not self.fused else nullcontext():
                h, state = m(x, None, 0)
            self.h = h[-1].expand(batch, -1).contiguous()                  # (B, D)
            if not self.fused:
                self.state = _expand_state(state, batch)
            else:
                parts = state if isinstance(state, tuple) else (state,)    # each (L, 1, H)
                per_layer = [[p[k].expand(batch, -1).contiguous() for p in parts]
                             for k in range(len(self.weights))]
                self.state = [tuple(s) if self.lstm else s[0] for s in per_layer]

    def _autocast(self):
        """Where the model runs its own recurrent module (one that is not stepped by hand): bf16
        autocast under ``precision="bf16"`` (where PyTorch has it for the device; on CPU it leaves
        ``nn.LSTM`` & co. in float32), else nothing."""
        if self._bf16_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def scores(self) -> torch.Tensor:
        """Unnormalised next-token log-scores (B, V) float32, a fresh tensor."""
        if self.adaptive is not None:
            lp = self.adaptive(self.h.float())
            if self.mask_unk:
                lp[:, UNK_ID] = NEG_INF
            return lp
        return self.decoder(self.h.float(), self.dec_bias)                          # (B, V)

    def advance(self, ids: torch.Tensor) -> None:
        m = self.model
        if not self.fused:
            with self._autocast():
                h, self.state = m(ids.view(1, -1), self.state, 0)
            self.h = h[0]
            return
        st = self.state
        if self.stack is not None:
            x = None if self.table is not None else m.embedding.weight.index_select(0, ids)
            self.stack.step(x, ids, st)
        else:
            w_ih, w_hh, b_ih, b_hh = self.weights[0]
            if self.table is not None:
                n = ids.numel()
                x0, w0 = self._no_input
                if x0.size(0) != n:
                    x0 = self._no_input[0] = w_ih.new_empty(n, 0)
                st[0] = self.cell(x0, st[0], w0, w_hh, self.table.index_select(0, ids), b_hh)
            else:
                st[0] = self.cell(m.embedding.weight.index_select(0, ids), st[0], w_ih, w_hh, b_ih, b_hh)
            for k in range(1, len(st)):
                inp = st[k - 1][0] if self.lstm else st[k - 1]
                st[k] = self.cell(inp, st[k], *self.weights[k])
        out = st[-1][0] if self.lstm else st[-1]                       # (B, H); dropout is off in eval
        if len(m.head):
            out = m.head(out)
        if m.proj is not None:
            out = m.proj(out)
        self.h = out


def _draw(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of `scores` (B, V), with probability softmax(scores): inverse CDF.

    One uniform number per row instead of torch.multinomial's V exponentials (a quarter of a
    millisecond per step at V = 10k). Computed in float64, so a token of probability 0 (-inf)
    is never returned.
    """
    cdf = torch.softmax(scores, -1, dtype=torch.float64).cumsum_(-1)     # (B, V)
    u = torch.rand(cdf.size(0), 1, generator=gen, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1).view(-1)


class _Uniforms:
    """Uniform numbers in [0, 1) from `gen` as Python floats, drawn `block` at a time (float64): on
    the CPU the same numbers, in the same order, as one ``torch.rand(1, 1, dtype=torch.float64)``
    per token, for a fraction of the calls."""

    def __init__(self, gen: torch.Generator, block: int = 256):
        self.gen, self.block = gen, block
        self.left: list[float] = []

    def __call__(self) -> float:
        if not self.left:
            self.left = torch.rand(self.block, generator=self.gen, dtype=torch.float64,
                                   device=self.gen.device).tolist()[::-1]
        return self.left.pop()


def _draw_one(scores: torch.Tensor, u: float) -> torch.Tensor:
    """:func:`_draw` for a single row of `scores` (1, V) and a uniform number `u` in [0, 1): the
    token (1,), by the same float64 inverse CDF in fewer calls (the interactive case, batch 1).

    The CDF's last entry is 1 up to float64 rounding; should `u` fall at or above it (a chance of
    about 1e-16), the token is the last one of positive probability, so a token of probability 0
    is never returned.
    """
    cdf = torch.softmax(scores.view(-1), 0, dtype=torch.float64).cumsum_(0)
    k = torch.searchsorted(cdf, u, right=True)
    if int(k) == cdf.numel():
        k = torch.searchsorted(cdf, cdf[-1:])        # the first entry that reaches the total
    return k.view(1)


def _ranked(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k scores along the last dimension and their ids, most probable first (all of them,
    sorted, without top-k)."""
    if 0 < top_k < scores.size(-1):
        return torch.topk(scores, top_k, dim=-1)
    return torch.sort(scores, dim=-1, descending=True)


def _candidates(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What top-k then top-p leave of `scores` (B, V), in order of probability: (probs, ids), each (B, K).

    The same selection as :func:`_truncate` (the same float64 softmax and cumulative masses), kept
    in sorted order instead of being scattered back: probs are unnormalised float64 weights, 0 for
    the tokens top-p drops (and for tokens at -inf). K = top_k, or V without top-k.
    """
    vals, ids = _ranked(scores, top_k)
    probs = torch.softmax(to_float64(vals), dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)   # mass of the better tokens
    return probs, ids


def _draw_candidates(probs: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row, with probability proportional to `probs` (B, K) over `ids`: inverse CDF."""
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.size(0), 1, generator=gen, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    j = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1)
    return ids.gather(1, j).view(-1)


# a single sample's top-k / top-p draw runs over Python floats when there are at most this many candidates
_FEW_CANDIDATES = 256


def _draw_few(scores: torch.Tensor, top_k: int, top_p: float, u: float) -> torch.Tensor:
    """:func:`_candidates` then :func:`_draw_candidates` for a single row of `scores` (1, V) with at
    most ``_FEW_CANDIDATES`` candidates, and a uniform number `u` in [0, 1): the token (1,).

    The candidates (``topk`` or ``sort``) and their float64 softmax are computed by PyTorch as in
    :func:`_candidates`; the nucleus mask, the cumulative sums and the search run over the few
    candidates as Python floats, the same float64 operations in the same order (PyTorch's CPU
    ``cumsum`` adds left to right), so the token is the one the tensor path draws from the same `u`
    -- in three calls instead of about fifteen (the interactive case, batch 1).
    """
    vals, ids = _ranked(scores.view(-1), top_k)
    probs = torch.softmax(vals, 0, dtype=torch.float64).tolist()
    cdf, total = [], 0.0
    if top_p < 1.0:
        mass = 0.0
        for p in probs:
            mass += p
            total += p if mass - p < top_p else 0.0          # top-p drops a token once the better ones reach p
            cdf.append(total)
    else:
        cdf = list(itertools.accumulate(probs))
        total = cdf[-1]
    j = min(bisect.bisect_right(cdf, u * total), len(cdf) - 1)
    return ids[j:j + 1]


def _expand_state(state, batch: int):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(_expand_state(s, batch) for s in state)
    return state.expand(state.size(0), batch, *state.shape[2:]).contiguous()


# -- the sampler ---------------------------------------------------------------------------------

def check_options(temperature=None, top_k=None, top_p=None, max_length=None, num_samples=None, seed=None,
                  flags: bool = False) -> None:
    """The sampling options' rules, one UsageError per broken one (None: not given). With `flags`
    the messages name the command-line options (--top-k) rather than the arguments (top_k)."""
    from .config import COUNT_MAX, SEED_MAX, SEED_MIN

    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if flags else arg
    for arg, v, kind in (("max_length", max_length, int), ("num_samples", num_samples, int), ("top_k", top_k, int),
                         ("seed", seed, int), ("temperature", temperature, (int, float)),
                         ("top_p", top_p, (int, float))):
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
            raise UsageError(f"{name(arg)} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise UsageError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise UsageError(f"{name('top_k')} must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):  # also false for NaN
        raise UsageError(f"{name('top_p')} must lie in (0, 1], got {top_p}")
    if max_length is not None and not 0 <= max_length <= COUNT_MAX:
        raise UsageError(f"{name('max_length')} must lie in [0, {COUNT_MAX}], got {max_length}")
    if num_samples is not None and not 0 <= num_samples <= COUNT_MAX:
        raise UsageError(f"{name('num_samples')} must lie in [0, {COUNT_MAX}], got {num_samples}")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise UsageError(f"{name('seed')} must lie in [{SEED_MIN}, {SEED_MAX}], got {seed}")


def _memory_size(device: torch.device) -> int | None:
    """The machine's physical memory in bytes, for a batch on the CPU (None: not known here, or another
    device, where a batch too large fails with an allocation error that says so)."""
    if device.type != "cpu":
        return None
    try:
        import os
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


class Sampler:
    """Draws samples from an RNNLM (the forward direction).

    >>> sampler = Sampler(model, vocab, tokenizer)                      # doctest: +SKIP
    >>> [s.text for s in sampler.generate("The ", num_samples=2, seed=1)]  # doctest: +SKIP
    """

    def __init__(self, model, vocab: Vocab, tokenizer: Tokenizer, device: torch.device | str = "cpu",
                 precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.model = model  # its train/eval mode is left alone: generate() samples in eval mode and restores it
        # "bf16": the large matrices (recurrent layers, output layer, adaptive softmax) are read in
        # bfloat16 (:class:`_BF16`, :func:`_product`), a recurrent module that is not stepped by hand
        # runs under bf16 autocast; states, cells and draws stay float32
        self.precision = precision
        self.vocab = vocab
        self.tok = tokenizer
        if isinstance(device, str):
            from .train import select_device
            device = select_device(device, "device")  # an unknown or unavailable device: a UsageError
        self.device = torch.device(device)
        self._prepared: tuple | None = None  # (key, parameters, _Stepper) of the last generate call

    def _check_batch_memory(self, B: int, max_length: int) -> None:
        """Refuse a batch that cannot fit in the machine's memory before allocating it: on Linux such a
        batch is not an allocation error but the kernel's out-of-memory killer, which says nothing.
        Per sample, roughly: the V scores and their temperature / top-k / float64 CDF copies, a few
        copies of the recurrent state, and the first 256 generated ids."""
        m = self.model
        H = getattr(m, "hidden_size", 0) * getattr(m, "num_layers", 1) * 2
        need = B * (32 * len(self.vocab) + 16 * H + 8 * min(max_length, 256))
        have = _memory_size(self.device)
        if have is not None and need > have:
            raise UsageError(f"--num-samples {B:,} is one batch, which needs about {need / 2**30:,.1f} GiB "
                             f"({len(self.vocab):,} scores per sample at every step), more than this machine's "
                             f"{have / 2**30:,.1f} GiB; draw fewer samples at a time")

    def _stepper(self, batch: int = 1) -> _Stepper:
        """The per-model preparation (weight blocks, the token table) for `batch` samples, kept
        between calls.

        It is rebuilt between batch 1 and larger batches where they use other kinds of products
        (on CPU with oneDNN, :func:`_packs`), and when any parameter changed: another tensor, dtype or device, or an in-place
        update through PyTorch (an optimizer step, ``load_state_dict``), which bumps the tensor's
        version counter. Writes through ``.data`` bump nothing: call :meth:`refresh` after those.
        Inference tensors (a model built under ``torch.inference_mode``) have no version counter:
        such a model is prepared on every call.
        """
        params = list(self.model.parameters())
        if any(p.is_inference() for p in params):  # no version counter to watch: prepare every time
            self._prepared = None
            return _Stepper(self.model, self.device, batch, self.precision)
        key = (self.device, torch.get_num_threads(), _packs(self.device, batch), self.precision,
               tuple((p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in params))
        if self._prepared is not None:
            old_key, old_params, step = self._prepared
            if old_key == key and len(old_params) == len(params) and all(
                    a is b for a, b in zip(old_params, params)):
                return step
        step = _Stepper(self.model, self.device, batch, self.precision)
        self._prepared = (key, params, step)
        return step

    def refresh(self) -> None:
        """Forget the prepared weights (after changing parameters through ``.data``)."""
        self._prepared = None

    def encode_prime(self, prime: str) -> tuple[list[int], int]:
        """Context ids for a prime text (the start context <eos> first) and how many became <unk>.

        The prime is tokenized like training text, except that it is continued rather than
        ended: it gets an <eos> only where it closes a unit itself (a final newline under the
        line policy, a final blank line under the paragraph policy), and a final newline inside
        a paragraph stays a newline.
        """
        if not prime:
            return [EOS_ID], 0
        # Tokenize the prime followed by a sentinel token and drop the sentinel (and the EOS that
        # ends the text): what is left is exactly how the prime's own text tokenizes mid-stream.
        sentinel = "x" if self.tok.level == "char" else " x"
        tokens = self.tok.tokenize(prime + sentinel)
        tail = ["x"] if self.tok.eos == "none" else ["x", EOS]
        if tokens[-len(tail):] == tail:
            tokens = tokens[:-len(tail)]
        else:  # pragma: no cover - a tokenizer that merges the sentinel; fall back to the plain tokens
            tokens = self.tok.tokenize(prime)
            if tokens and tokens[-1] == EOS:
                tokens.pop()
        ids = self.vocab.encode(tokens)
        unknown = sum(1 for t, i in zip(tokens, ids) if i == UNK_ID and t != UNK)
        return [EOS_ID] + ids, unknown

    def generate(self, prime: str = "", num_samples: int = 1, max_length: int = 500, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False, allow_unk: bool = False,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> list[Sample]:
        """Generate `num_samples` continuations of `prime`, drawn as one batch.

        on_text, if given (single sample), receives each new piece of text as it is generated.
        """
        given = {"num_samples": num_samples, "max_length": max_length, "temperature": temperature,
                 "top_k": top_k, "top_p": top_p}
        missing = next((k for k, v in given.items() if v is None), None)
        if missing:
            raise UsageError(f"{missing} must be given (None is not a value here)")
        check_options(temperature, top_k, top_p, max_length, num_samples, seed)
        if num_samples == 0:
            return []
        greedy = greedy or temperature == 0
        self._check_batch_memory(num_samples, max_length)
        context, unknown = self.encode_prime(prime)
        if unknown:
            warnings.warn(f"{unknown} prime token(s) are not in the vocabulary and are fed as <unk>", stacklevel=2)
        gen = torch.Generator(device=float64_device(self.device))  # draws are float64: the CPU's for MPS
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        with torch.inference_mode():
            ids, stops = self._run(context, num_samples, max_length, greedy, temperature, top_k, top_p,
                                   allow_unk, gen, prime, on_text)
        samples = []
        for seq, stop in zip(ids, stops):
            generated = self.tok.detokenize(self.vocab.decode(seq))
            samples.append(Sample(self._join(prime, generated), generated, len(seq), stop))
        return samples

    def _run(self, context, B, max_length, greedy, temperature, top_k, top_p, allow_unk, gen, prime, on_text):
        """The generation loop: (token ids per sample, stop reason per sample)."""
        was_training = self.model.training
        self.model.eval()
        try:
            step = self._stepper(B)
            step.start(context, B, mask_unk=not allow_unk)
            truncate = top_k > 0 or top_p < 1
            elsewhere = gen.device.type != self.device.type   # MPS: the draws run on the CPU (float64)
            stream = on_text if B == 1 else None
            # the batch's tokens, (T, B): grown by doubling, so a large --max-length costs nothing
            # until samples actually run that long
            out = torch.empty(min(max_length, 256) if B > 1 else 0, B, dtype=torch.long, device=self.device)
            length = torch.full((B,), max_length, dtype=torch.long, device=self.device)
            done = torch.zeros(B, dtype=torch.bool, device=self.device)
            single: list[int] = []
            # batch 1, sampling on the device of the draws: one float per token from a block; with
            # top-k / top-p only where the candidates are few enough to draw among as Python floats
            lone_sample = B == 1 and not (greedy or elsewhere)
            V = len(self.vocab)
            few = lone_sample and truncate and (top_k if 0 < top_k < V else V) <= _FEW_CANDIDATES
            uniform = _Uniforms(gen) if few or (lone_sample and not truncate) else None
            for t in range(max_length):
                scores = step.scores()                      # (B, V), a fresh tensor, UNK at -inf unless allowed
                if greedy:
                    nxt = scores.argmax(-1)
                else:
                    if elsewhere:
                        scores = scores.to(gen.device)
                    if temperature != 1.0:
                        scores.div_(temperature)
                    if few:
                        nxt = _draw_few(scores, top_k, top_p, uniform())
                    elif truncate:  # sample among the sorted candidates: no scatter back to V
                        nxt = _draw_candidates(*_candidates(scores, top_k, top_p), gen)
                    elif uniform is not None:
                        nxt = _draw_one(scores, uniform())
                    else:
                        nxt = _draw(scores, gen)
                    if elsewhere:
                        nxt = nxt.to(self.device)
                if B == 1:  # the common interactive case: plain Python bookkeeping, one sync
                    i = int(nxt)
                    if i == EOS_ID:
                        return [single], ["eos"]
                    single.append(i)
                    if stream is not None:
                        stream(self._piece(single, prime))
                else:
                    if t == out.size(0):
                        out = torch.cat([out, torch.empty_like(out)[: max_length - t]])
                    out[t] = nxt
                    ended = (nxt == EOS_ID) & ~done
                    length = torch.where(ended, t, length)
                    done |= ended
                    if bool(done.all()):
                        break
                if t + 1 < max_length:
                    step.advance(nxt)
            if B == 1:
                return [single], ["length"]
            n = length.tolist()
            cols = out[: max(n, default=0)].t().tolist()
            return [cols[b][: n[b]] for b in range(B)], ["length" if k == max_length else "eos" for k in n]
        finally:
            if was_training:
                self.model.train()

    def _piece(self, ids: list[int], prime: str) -> str:
        """Text added by the newest token (for streaming after the prime was printed)."""
        tok = self.vocab.itos[ids[-1]]
        if self.tok.level == "char":
            return tok
        first = len(ids) == 1
        return ("" if first and (not prime or prime[-1:].isspace()) else " ") + tok

    def _join(self, prime: str, generated: str) -> str:
        if not prime:
            return generated
        if self.tok.level == "word" and generated and not prime[-1:].isspace():
            return prime + " " + generated
        return prime + generated
