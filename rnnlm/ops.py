"""A fused linear + softmax cross-entropy for large vocabularies.

With a 10k-word vocabulary the output layer of a small LSTM LM is most of the work, and in
PyTorch's composed path (``linear -> float() -> log_softmax -> nll_loss``) most of *that*
is memory traffic: the (N, V) logits are copied to fp32, a log-softmax is written, a
zero-filled one-hot gradient is scattered, the log-softmax backward reads both back... about
ten passes over an (N, V) array per step.

:func:`linear_cross_entropy` does it in a few: the logits matmul (plus the bias: folded into the
matmul as an extra input column in bf16/fp16, added inside oneDNN's fp32 product on CPU, in place
otherwise), PyTorch's fused softmax kernel writing the probabilities (over the logits, on CPU),
``-log p(target)`` gathered from them, and in backward the in-place ``p - onehot`` followed by the
gradient matmuls, with the 1/N scale folded into the small operands. The probabilities are kept in
the matmul's dtype (bf16 under bf16 autocast, fp32 otherwise), exactly the precision autocast would
feed the backward matmuls anyway; in fp32 the result equals ``F.cross_entropy(F.linear(h, W, b),
y)`` to rounding (tests compare to 1e-10 in float64). fp32 products on CPU go to oneDNN rather than
PyTorch's default BLAS where that works (:func:`onednn_f32_matmul`). A target probability under
1e-30 (a loss above ~69 nats; fp32 underflows to 0 beyond ~103) is too small to take the log of:
those few rows' losses are recomputed from their logits, so a model sure of a wrong token reports
its true, finite loss instead of an infinite one that would read as divergence.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

_ONEDNN_F32: bool | None = None
_ONEDNN_PACKED: bool | None = None
_INPLACE_SOFTMAX: dict[torch.dtype, bool] = {}


def _inplace_softmax_is_exact(dtype: torch.dtype) -> bool:
    """Does PyTorch's CPU softmax give the same bits when its output is its input? (It reads each row
    before writing it, so it should; checked once per dtype on a private generator's numbers, so
    the global random stream is untouched. Any failure means: don't.)"""
    try:
        g = torch.Generator().manual_seed(0)
        a = (torch.randn(6, 4099, generator=g) * 4).to(dtype)
        want = torch.softmax(a, dim=1)
        torch._softmax(a, 1, False, out=a)
        return bool(torch.equal(a, want))
    except Exception:
        return False


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, dim=1)`` for a 2-D tensor, written over `x` on CPU (where the kernel allows
    it): one (N, V) buffer instead of two, which keeps the logits/probabilities in cache better.
    Elsewhere, and if the check fails, a new tensor; also while torch.compile traces (the check would
    be traced into the graph, and the compiler fuses the plain softmax anyway)."""
    if x.device.type == "cpu" and x.is_contiguous() and not compiling():
        ok = _INPLACE_SOFTMAX.get(x.dtype)
        if ok is None:
            ok = _INPLACE_SOFTMAX[x.dtype] = _inplace_softmax_is_exact(x.dtype)
        if ok:
            return torch._softmax(x, 1, False, out=x)
    return torch.softmax(x, dim=1)


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 arithmetic on `device`'s tensors is done: on `device` itself, or on the CPU
    where the device has no float64. That is MPS: Metal has no double type, and PyTorch raises
    ("Cannot convert a MPS Tensor to float64 dtype") on any float64 tensor there. rnnlm sums
    NLLs and draws samples in float64, so on a Mac those steps run on the CPU."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def to_float64(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64, on its own device, or copied to the CPU first where that device has no
    float64 (:func:`float64_device`)."""
    if float64_device(t.device) != t.device:
        t = t.cpu()
    return t.double()


def autocast_available(device_type: str) -> bool:
    """Whether this PyTorch has autocast for `device_type` (older versions have none for MPS)."""
    check = getattr(torch.amp, "is_autocast_available", None)
    if check is not None:
        return bool(check(device_type))
    try:
        torch.autocast(device_type, enabled=False)
        return True
    except RuntimeError:
        return False


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False where PyTorch has no autocast for that
    device type (MPS in older versions, where the question raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)``: autocast off inside. Where PyTorch has no
    autocast for the device type (MPS in older versions, where making one raises even to turn it
    off) nothing can be autocast anyway: an empty context."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return nullcontext()


def linear_onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` in fp32 on CPU by oneDNN: ``torch.ops.mkldnn._linear_pointwise``, the op
    PyTorch's inductor compiles CPU linears to. Strided (transposed) operands are fine."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


def compiling() -> bool:
    """Whether torch.compile is tracing this call: the direct oneDNN calls are then left out (the
    compiler cannot lower them, and makes its own choice of matmul kernels)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def onednn_f32_matmul() -> bool:
    """Whether the fused cross-entropy sends its fp32 CPU matmuls to oneDNN instead of PyTorch's
    default BLAS. On this project's AMD EPYC, MKL's sgemm takes its AVX2 path and runs the
    700x200x10,000 products at ~170 GFLOP/s, oneDNN's AVX-512 kernels at ~400. Checked once per
    process against ``torch.addmm`` (any error or mismatch: no); ``RNNLM_ONEDNN_MATMUL=0`` turns
    it off, and so does torch.compile while it traces (see :func:`compiling`)."""
    global _ONEDNN_F32
    if compiling():
        return False
    if _ONEDNN_F32 is None:
        _ONEDNN_F32 = False
        if os.environ.get("RNNLM_ONEDNN_MATMUL", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                g = torch.Generator().manual_seed(0)
                x, w, b, c = (torch.randn(*shape, generator=g) for shape in ((9, 33), (17, 33), (17,), (9, 17)))
                _ONEDNN_F32 = bool(  # contiguous with a bias, and transposed views (as in backward)
                    torch.allclose(linear_onednn(x, w, b), torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5)
                    and torch.allclose(linear_onednn(x.t(), c.t()), x.t() @ c, rtol=1e-5, atol=1e-5))
            except Exception:
                _ONEDNN_F32 = False
    return _ONEDNN_F32


def _linear_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                plain: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` for fp32 CPU tensors: oneDNN, or PyTorch's matmul if oneDNN ever refuses
    (then for the rest of the process), so a shape oneDNN cannot take costs speed, not the run.
    `plain` is the ordinary tensor behind a oneDNN-packed `w`, for that fallback."""
    global _ONEDNN_F32
    if _ONEDNN_F32:
        try:
            return linear_onednn(x, w, b)
        except RuntimeError:
            _ONEDNN_F32 = False
    out = x @ (w if plain is None else plain).t()
    return out.add_(b) if b is not None else out


def _packed_weights_ok() -> bool:
    """Does oneDNN's packed-weight linear (``torch.ops.mkldnn._reorder_linear_weight``, then
    ``_linear_pointwise``) give ``x @ w.T``? Checked once per process, like :func:`onednn_f32_matmul`."""
    global _ONEDNN_PACKED
    if _ONEDNN_PACKED is None:
        _ONEDNN_PACKED = False
        if onednn_f32_matmul():
            try:
                g = torch.Generator().manual_seed(1)
                x, w = torch.randn(5, 24, generator=g), torch.randn(40, 24, generator=g)
                wp = torch.ops.mkldnn._reorder_linear_weight(w, 5)
                _ONEDNN_PACKED = bool(torch.allclose(linear_onednn(x, wp), x @ w.t(), rtol=1e-5, atol=1e-5))
            except Exception:
                _ONEDNN_PACKED = False
    return _ONEDNN_PACKED


def step_matmul(w: torch.Tensor, batch_size: int, steps: int):
    """``x -> x @ w.T`` through oneDNN for the per-step products of a recurrent loop (`steps` calls,
    x of `batch_size` rows, the same weight `w`), or None where that does not pay: the caller then
    keeps its own ``torch.addmm``.

    For fp32 CPU tensors over enough steps (>= 8), `w` is packed once into oneDNN's blocked layout
    and each product is one ``_linear_pointwise`` (this CPU: a 20x512 . 512x2048 product ~100 us
    instead of ~350 with MKL's ``addmm``). Other dtypes and devices, few steps, oneDNN off
    (``RNNLM_ONEDNN_MATMUL=0``) or failing its start-up check: None. An error from oneDNN later in
    the run switches it off for the rest of the process (as :func:`_linear_f32`) and that product
    is computed with ``torch.mm`` instead, so it costs speed, not the run.
    """
    if not (w.dtype == torch.float32 and w.device.type == "cpu" and steps >= 8 and batch_size > 0
            and not compiling() and _packed_weights_ok()):
        return None
    try:
        wp = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_size)
    except RuntimeError:
        return None
    return lambda x: _linear_f32(x, wp, plain=w)


def fp32_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``, through oneDNN for fp32 on CPU outside autocast (see
    :func:`onednn_f32_matmul`); used for the exact fp32 logits of evaluation."""
    if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.size(0) > 0 and not torch.is_autocast_enabled("cpu") and onednn_f32_matmul()):
        return _linear_f32(x, w, b)
    return torch.nn.functional.linear(x, w, b)


_P_EXACT = 1e-30  # target probabilities below this get their loss from the logits (see _LinearCrossEntropy)


def _fold_bias(compute_dtype: torch.dtype) -> bool:
    """Fold the bias into the logits matmul (16-bit compute dtypes; see _LinearCrossEntropy)."""
    return compute_dtype in (torch.bfloat16, torch.float16)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                compute_dtype: torch.dtype, reduction: str):
        folded = bias is not None and _fold_bias(compute_dtype)
        if folded:
            # The bias rides in the matmul as one more input column, [h, 1, 0..] @ [W, b, 0..]^T
            # (zero-padded to a multiple of 16): no extra pass over the (N, V) logits, and in backward
            # the bias gradient is a column of the weight-gradient matmul instead of a GEMV over them.
            # For 16-bit matmuls only: they copy the weight to the compute dtype anyway.
            D = h.size(1)
            Kp = -(-(D + 1) // 16) * 16
            hc = h.new_empty(h.size(0), Kp, dtype=compute_dtype)
            hc[:, :D] = h
            hc[:, D] = 1
            hc[:, D + 1:] = 0
            wc = weight.new_empty(weight.size(0), Kp, dtype=compute_dtype)
            wc[:, :D] = weight
            wc[:, D] = bias
            wc[:, D + 1:] = 0
        else:
            hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
        onednn = (not folded and compute_dtype == torch.float32 and h.device.type == "cpu" and h.numel() > 0
                  and onednn_f32_matmul())
        if onednn:  # fp32 on CPU: oneDNN, the bias added inside the matmul
            logits = _linear_f32(hc, wc, bias.to(compute_dtype) if bias is not None else None)
        else:
            logits = hc @ wc.t()                                               # (N, V)
            if bias is not None and not folded:
                logits.add_(bias.to(compute_dtype))
        # PyTorch's fused softmax kernel (fp32 arithmetic inside), output in the matmul dtype:
        # what autocast would feed the backward matmuls anyway; over the logits where it can.
        # fp16 is the exception: it flushes probabilities under 6e-8 to zero, so a target given
        # less than that (a loss above 16.6 nats, not rare in early training) would read as an
        # infinite loss. Its probabilities stay fp32; backward casts p - onehot to fp16.
        probs = torch.softmax(logits, dim=1, dtype=torch.float32) if compute_dtype == torch.float16 \
            else softmax_(logits)
        del logits
        acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
        # -log p(target). A target probability under _P_EXACT (a loss over ~69 nats: the model is
        # sure of another token; it happens in real runs) is too small to hold accurately, or
        # underflows to 0: those rows' losses come from their logits, recomputed in `acc`.
        p_t = probs.gather(1, target.unsqueeze(1)).squeeze(1).to(acc)
        loss = -p_t.log()
        small = p_t < _P_EXACT
        if bool(small.any()):  # rare; a host read, which costs nothing on CPU
            rows = small.nonzero().squeeze(1)
            z = hc[rows].to(acc) @ wc.to(acc).t()
            if bias is not None and not folded:
                z = z + bias.to(acc)
            loss[rows] = torch.logsumexp(z, 1) - z.gather(1, target[rows].unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(hc, wc, target)
        ctx.probs = probs  # not saved_tensors: backward consumes it in place, exactly once
        ctx.has_bias = bias is not None
        ctx.folded, ctx.D, ctx.onednn = folded, h.size(1), onednn
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.reduction = reduction
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # backward reuses the saved probabilities in place
    def backward(ctx, grad_out: torch.Tensor):
        hc, wc, target = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        if probs is None:
            raise RuntimeError("linear_cross_entropy supports one backward pass per forward (no retain_graph)")
        N = probs.size(0)
        g = probs  # reused in place: d loss_i / d logits_i = p_i - onehot(y_i)
        g[torch.arange(N, device=g.device), target] -= 1
        if g.dtype != hc.dtype:  # fp16: probabilities kept in fp32 (see forward)
            g = g.to(hc.dtype)
        # The upstream gradient scales rows of g; fold it into the small operands instead of
        # touching the (N, V) array again: r (N,) is the weight of each row.
        cd = g.dtype
        rd = torch.float64 if cd == torch.float64 else torch.float32
        if ctx.reduction == "none":
            r = grad_out.to(rd)
        else:
            scale = grad_out / N if ctx.reduction == "mean" else grad_out
            r = scale.to(rd).expand(N)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.onednn:  # the fp32 CPU route (oneDNN, or PyTorch's matmul if oneDNN refused)
            # dH = g W, and [h r | r]^T g in one product whose last row is the bias gradient.
            rr = r.unsqueeze(1).to(cd)
            grad_h = (_linear_f32(g, wc.t()) * rr).to(h_dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad_b = None
            want_b = ctx.has_bias and ctx.needs_input_grad[2]
            if ctx.needs_input_grad[1] or want_b:
                a = torch.cat([hc * rr, rr], 1) if ctx.has_bias else hc * rr  # (N, D [+ 1])
                t = _linear_f32(a.t(), g.t())                                  # (D [+ 1], V) = a^T g
                D = ctx.D
                grad_w = t[:D].t().contiguous().to(w_dtype) if ctx.needs_input_grad[1] else None
                grad_b = t[D].to(b_dtype) if want_b else None
            return grad_h, grad_w, grad_b, None, None, None
        if not ctx.folded:
            grad_h = ((g @ wc) * r.unsqueeze(1).to(cd)).to(h_dtype) if ctx.needs_input_grad[0] else None
            grad_w = (g.t() @ (hc * r.unsqueeze(1).to(cd))).to(w_dtype) if ctx.needs_input_grad[1] else None
            grad_b = (r.to(cd).unsqueeze(0) @ g).squeeze(0).to(b_dtype) \
                if ctx.has_bias and ctx.needs_input_grad[2] else None
            return grad_h, grad_w, grad_b, None, None, None
        D = ctx.D
        grad_h = ((g @ wc)[:, :D] * r.unsqueeze(1).to(cd)).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = g.t() @ (hc * r.unsqueeze(1).to(cd))
        grad_w = gw[:, :D].to(w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = gw[:, D].to(b_dtype) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float(), target, reduction=...)``, fused.

    h: (N, D), weight: (V, D), bias: (V,) or None, target: (N,) int64. Honours autocast:
    under CPU/CUDA autocast the matmuls run in the autocast dtype, the softmax in fp32.
    """
    dt = h.dtype
    if autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
    elif weight.dtype != h.dtype:
        dt = torch.promote_types(h.dtype, weight.dtype)
    with no_autocast(h.device.type):
        return _LinearCrossEntropy.apply(h, weight, bias, target, dt, reduction)


def adaptive_target_log_prob(asm: torch.nn.AdaptiveLogSoftmaxWithLoss, h: torch.Tensor,
                             target: torch.Tensor) -> torch.Tensor:
    """log p(target | h) under an adaptive softmax: (N, D), (N,) -> (N,) float32.

    The arithmetic of ``AdaptiveLogSoftmaxWithLoss.forward(h, target).output`` -- log p of the
    target's cluster in the head plus, outside the shortlist, log p of the target within its
    cluster -- but autocast-safe: the matmuls run in the autocast dtype while every log-softmax
    is taken in float32 (the module itself fails under CPU bf16 autocast, mixing dtypes in its
    ``index_copy_``). With gradients enabled the head goes through :func:`linear_cross_entropy`.
    """
    head_target = target.clone()
    out = torch.zeros(target.size(0), dtype=torch.float32, device=h.device)
    bounds = [0] + list(asm.cutoffs)
    for i in range(1, len(bounds) - 1):
        rows = ((target >= bounds[i]) & (target < bounds[i + 1])).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        head_target.index_fill_(0, rows, asm.shortlist_size + i - 1)
        logits = asm.tail[i - 1](h.index_select(0, rows)).float()
        within = (target.index_select(0, rows) - bounds[i]).unsqueeze(1)
        out = out.index_add(0, rows, torch.log_softmax(logits, dim=1).gather(1, within).squeeze(1))
    if torch.is_grad_enabled():  # training: the fused head
        head_nll = linear_cross_entropy(h, asm.head.weight, asm.head.bias, head_target, "none")
    else:                        # evaluation: the plain fp32 log-softmax, exact where a probability underflows
        head_nll = torch.nn.functional.cross_entropy(asm.head(h).float(), head_target, reduction="none")
    return out - head_nll.float()
