"""The fused linear + cross-entropy equals the composed PyTorch ops."""

import pytest
import torch
import torch.nn.functional as F

from rnnlm.ops import linear_cross_entropy


def _inputs(N=37, D=16, V=3001, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, b, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_cross_entropy_and_its_gradients(reduction, bias):
    h, W, b, y = _inputs(bias=bias)
    params = [h, W] + ([b] if bias else [])
    w_out = torch.rand(h.size(0), dtype=torch.float64) if reduction == "none" else None
    ours = linear_cross_entropy(h, W, b, y, reduction)
    ref = F.cross_entropy(F.linear(h, W, b), y, reduction=reduction)
    assert torch.allclose(ours, ref, atol=1e-10)
    go = torch.autograd.grad((ours * w_out).sum() if w_out is not None else ours, params)
    gr = torch.autograd.grad((ref * w_out).sum() if w_out is not None else ref, params)
    for a, c in zip(go, gr):
        assert torch.allclose(a, c, atol=1e-10)


def test_second_backward_is_refused_not_wrong():
    h, W, b, y = _inputs(N=5, D=3, V=7)
    loss = linear_cross_entropy(h, W, b, y, "sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_bf16_autocast_close_to_reference():
    h, W, b, y = _inputs(N=64, D=32, V=5000)
    h, W, b = (t.detach().float().requires_grad_() for t in (h, W, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, b, y)
    ref = F.cross_entropy(F.linear(h, W, b), y)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) / ref.item() < 5e-3
    ours.backward()
    assert W.grad.dtype == torch.float32 and torch.isfinite(W.grad).all()
    gW = W.grad.clone()
    W.grad = None
    ref.backward()
    cos = F.cosine_similarity(gW.flatten(), W.grad.flatten(), dim=0)
    assert cos > 0.99


def test_allocator_tuning_applies_once_and_can_be_disabled(monkeypatch):
    import sys

    import rnnlm.allocator as alloc
    monkeypatch.setattr(alloc, "_done", False)
    monkeypatch.setenv("RNNLM_MALLOC_TUNING", "0")
    assert alloc.tune_allocator() is False and alloc._done is False
    monkeypatch.delenv("RNNLM_MALLOC_TUNING")
    applied = alloc.tune_allocator()
    if sys.platform.startswith("linux") and applied:
        assert alloc._done is True and alloc.tune_allocator() is True


# -- adaptive softmax ----------------------------------------------------------------------------

def _asm(seed: int = 0) -> torch.nn.AdaptiveLogSoftmaxWithLoss:
    torch.manual_seed(seed)
    return torch.nn.AdaptiveLogSoftmaxWithLoss(12, 300, [20, 90], div_value=2.0).double()


@pytest.mark.parametrize("grad", [True, False])
def test_adaptive_target_log_prob_equals_the_module(grad):
    from rnnlm.ops import adaptive_target_log_prob
    asm = _asm()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 12, generator=g, dtype=torch.float64)
    y = torch.cat([torch.randint(0, 20, (20,), generator=g), torch.randint(20, 90, (24,), generator=g),
                   torch.randint(90, 300, (20,), generator=g)])
    with torch.set_grad_enabled(grad):
        got = adaptive_target_log_prob(asm, h, y)
    want = asm(h, y).output
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5)
    # and it is log p of the full distribution the module defines
    assert torch.allclose(got.double(), asm.log_prob(h).gather(1, y.unsqueeze(1)).squeeze(1), atol=1e-5)


def test_adaptive_target_log_prob_gradients_and_bf16_autocast():
    from rnnlm.ops import adaptive_target_log_prob
    asm = _asm(2).float()
    ref = _asm(2).float()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 12, generator=g)
    y = torch.randint(0, 300, (50,), generator=g)
    adaptive_target_log_prob(asm, h, y).mean().backward()
    ref(h, y).output.mean().backward()
    for a, b in zip(asm.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):         # the module itself fails here
        lp = adaptive_target_log_prob(asm, h, y)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp, ref(h, y).output.detach(), atol=0.1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias_folded_into_the_matmul_is_exact(reduction, monkeypatch):
    """The 16-bit path folds the bias into the logits matmul ([h, 1, 0..] @ [W, b, 0..]^T) and
    reads the bias gradient off the weight-gradient matmul; forced on in float64 it is exact."""
    import rnnlm.ops as ops
    monkeypatch.setattr(ops, "_fold_bias", lambda dtype: True)
    h, W, b, y = _inputs(N=29, D=13, V=501, seed=4)
    w_out = torch.rand(h.size(0), dtype=torch.float64) if reduction == "none" else None
    ours = linear_cross_entropy(h, W, b, y, reduction)
    ref = F.cross_entropy(F.linear(h, W, b), y, reduction=reduction)
    assert torch.allclose(ours, ref, atol=1e-10)
    go = torch.autograd.grad((ours * w_out).sum() if w_out is not None else ours, [h, W, b])
    gr = torch.autograd.grad((ref * w_out).sum() if w_out is not None else ref, [h, W, b])
    for a, c in zip(go, gr):
        assert a.shape == c.shape and torch.allclose(a, c, atol=1e-10)


def test_bf16_folded_bias_gradient_close_to_reference():
    from rnnlm.ops import _fold_bias
    assert _fold_bias(torch.bfloat16) and not _fold_bias(torch.float32)
    h, W, b, y = _inputs(N=64, D=32, V=5000, seed=5)
    h, W, b = (t.detach().float().requires_grad_() for t in (h, W, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h, W, b, y).backward()
    gb, gh = b.grad.clone(), h.grad.clone()
    b.grad = h.grad = None
    F.cross_entropy(F.linear(h, W, b), y).backward()
    assert F.cosine_similarity(gb, b.grad, dim=0) > 0.99
    assert F.cosine_similarity(gh.flatten(), h.grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("bias", [True, False])
def test_fp16_loss_stays_finite_where_the_target_probability_underflows_fp16(bias):
    """fp16 (CUDA mixed precision) flushes probabilities below 6e-8 to zero; a target the model
    puts below that -- a loss over 16.6 nats -- must still give a finite, accurate loss and
    gradient (fp16 matmuls run on the CPU too, slowly, so this is checked everywhere)."""
    h, W, b, y = _inputs(N=48, D=16, V=2003, bias=bias, seed=7)
    with torch.no_grad():
        # rows 0..7: the target's logit -30 (bias aside), far below the rest
        W[y[:8]] = -30 * h[:8] / (h[:8] * h[:8]).sum(1, keepdim=True)
    ref_loss = F.cross_entropy(F.linear(h, W, b), y)
    assert F.cross_entropy(F.linear(h, W, b), y, reduction="none")[:8].min() > 20  # p < 2e-9
    half = [t.detach().half().requires_grad_() for t in (h, W) + ((b,) if bias else ())]
    ours = linear_cross_entropy(half[0], half[1], half[2] if bias else None, y)
    assert ours.dtype == torch.float32 and torch.isfinite(ours)
    assert abs(ours.item() - ref_loss.item()) / ref_loss.item() < 5e-3
    ours.backward()
    ref_grads = torch.autograd.grad(ref_loss, [h, W] + ([b] if bias else []))
    for t, r in zip(half, ref_grads):
        assert t.grad.dtype == torch.float16 and torch.isfinite(t.grad).all()
        assert F.cosine_similarity(t.grad.double().flatten(), r.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(700, 10000), (3, 17), (64, 4099)])
def test_softmax_in_place_gives_the_same_bits(dtype, shape):
    """linear_cross_entropy writes the probabilities over the logits (one (N, V) buffer instead of
    two); that must change nothing: bit-identical to torch.softmax, and truly in place on CPU."""
    from rnnlm.ops import softmax_
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 5).to(dtype)
    want = torch.softmax(x, dim=1)
    ptr = x.data_ptr()
    got = softmax_(x)
    assert torch.equal(got, want)
    assert got.data_ptr() == ptr


def test_in_place_softmax_check_leaves_the_global_random_stream_alone():
    import rnnlm.ops as ops
    ops._INPLACE_SOFTMAX.clear()
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    ops.softmax_(torch.randn(2, 5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(4), a)
    assert ops._INPLACE_SOFTMAX[torch.float32] is True


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_onednn", [True, False])
def test_fp32_matches_float64_cross_entropy_with_and_without_onednn(reduction, bias, use_onednn, monkeypatch):
    """fp32 on CPU: the loss and all three gradients agree with float64 F.cross_entropy to fp32
    accuracy, whether the matmuls go to oneDNN (dH = g W and [h r | r]^T g, the bias gradient as
    the product's last row) or to PyTorch's default BLAS."""
    import rnnlm.ops as ops
    if use_onednn and not ops.onednn_f32_matmul():
        pytest.skip("oneDNN's fp32 linear is not usable in this PyTorch build")
    monkeypatch.setattr(ops, "_ONEDNN_F32", use_onednn)
    h64, W64, b64, y = _inputs(N=300, D=40, V=5003, bias=bias, seed=3)
    h, W = h64.detach().float().requires_grad_(), W64.detach().float().requires_grad_()
    b = b64.detach().float().requires_grad_() if bias else None
    w_out = torch.rand(h.size(0), dtype=torch.float64) if reduction == "none" else None
    ours = linear_cross_entropy(h, W, b, y, reduction)
    ref = F.cross_entropy(F.linear(h64, W64, b64), y, reduction=reduction)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)
    params, params64 = [h, W] + ([b] if bias else []), [h64, W64] + ([b64] if bias else [])
    go = torch.autograd.grad((ours * w_out.float()).sum() if w_out is not None else ours, params)
    gr = torch.autograd.grad((ref * w_out).sum() if w_out is not None else ref, params64)
    for a, c in zip(go, gr):
        assert a.dtype == torch.float32 and a.is_contiguous()
        assert (a.double() - c).abs().max() <= 1e-5 * c.abs().max() + 1e-9


def test_onednn_fp32_matmul_is_used_here_and_can_be_turned_off(monkeypatch):
    import rnnlm.ops as ops
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    monkeypatch.setattr(ops, "_ONEDNN_F32", None)
    assert ops.onednn_f32_matmul() is True               # the x86-64 CPU wheel has it
    monkeypatch.setattr(ops, "_ONEDNN_F32", None)
    monkeypatch.setenv("RNNLM_ONEDNN_MATMUL", "0")
    assert ops.onednn_f32_matmul() is False
    monkeypatch.setattr(ops, "_ONEDNN_F32", None)        # a failing op means: the default BLAS
    monkeypatch.delenv("RNNLM_ONEDNN_MATMUL")
    monkeypatch.setattr(ops, "linear_onednn", lambda *a: (_ for _ in ()).throw(RuntimeError("no such op")))
    assert ops.onednn_f32_matmul() is False


def test_fp32_linear_is_f_linear_to_fp32_accuracy_and_defers_to_autocast():
    """Evaluation's exact fp32 logits go through oneDNN where it is usable: the same numbers as
    F.linear to fp32 rounding; under autocast it is F.linear itself (bf16 out)."""
    from rnnlm.ops import fp32_linear
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(256, 200, generator=g), torch.randn(1000, 200, generator=g) * 0.1
    b = torch.randn(1000, generator=g)
    want = F.linear(x.double(), w.double(), b.double())
    got = fp32_linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (256, 1000)
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert fp32_linear(x[:0], w, b).shape == (0, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32_linear(x, w, b).dtype == torch.bfloat16


def test_a_refusal_by_onednn_mid_run_falls_back_to_the_default_matmul(monkeypatch):
    """If oneDNN raises for some shape after the start-up check passed, the step still gives the
    right loss and gradients (PyTorch's matmul), and oneDNN is not asked again."""
    import rnnlm.ops as ops
    monkeypatch.setattr(ops, "_ONEDNN_F32", True)
    calls = []

    def refuse(*args):
        calls.append(1)
        raise RuntimeError("could not create a primitive descriptor")
    monkeypatch.setattr(ops, "linear_onednn", refuse)
    h64, W64, b64, y = _inputs(N=50, D=8, V=301, seed=5)
    h, W, b = (t.detach().float().requires_grad_() for t in (h64, W64, b64))
    loss = linear_cross_entropy(h, W, b, y)
    loss.backward()
    ref = F.cross_entropy(F.linear(h64, W64, b64), y)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for a, c in ((h, h64), (W, W64), (b, b64)):
        assert torch.allclose(a.grad.double(), c.grad, atol=1e-6)
    assert ops._ONEDNN_F32 is False and len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_is_exact_where_the_target_probability_underflows_fp32(dtype, bias):
    """A model sure of another token can put its target below fp32's smallest probability
    (e^-186 in a real PTB run: logits +106 and -80). The true loss (186 nats, finite) must come
    out, not inf from -log(0); the gradient stays p - onehot (finite)."""
    h, W, b, y = _inputs(N=40, D=16, V=1001, bias=bias, seed=11)
    with torch.no_grad():
        # rows 0..4: target logit -90 and another token's +110 (bias aside): p(target) ~ e^-200
        W[y[:5]] = -90 * h[:5] / (h[:5] * h[:5]).sum(1, keepdim=True)
        other = (y[:5] + 1) % 1001
        W[other] = 110 * h[:5] / (h[:5] * h[:5]).sum(1, keepdim=True)
    args = [t.detach().to(dtype).requires_grad_() for t in (h, W)] + \
        ([b.detach().to(dtype).requires_grad_()] if bias else [None])
    ref = F.cross_entropy(F.linear(*[a.detach().double() if a is not None else None for a in args]), y,
                          reduction="none")
    assert ref[:5].min() > 150                                   # e^-150: below fp32's 1.4e-45
    ours = linear_cross_entropy(args[0], args[1], args[2], y, reduction="none")
    assert torch.isfinite(ours).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(ours.double()[:5], ref[:5], rtol=tol)  # the recomputed rows: exact
    assert torch.allclose(ours.double(), ref, rtol=tol, atol=2e-2)
    ours.mean().backward()
    assert all(torch.isfinite(a.grad).all() for a in args if a is not None)


# -- float64 where the device has none (MPS) -----------------------------------------------------

def test_float64_work_goes_to_the_cpu_for_mps_only():
    from rnnlm.ops import float64_device, to_float64
    assert float64_device("mps") == torch.device("cpu")
    assert float64_device(torch.device("mps:0")) == torch.device("cpu")
    for name in ("cpu", "cuda", "cuda:1", "meta"):
        assert float64_device(name) == torch.device(name)
    x = torch.randn(3, 4)
    y = to_float64(x)
    assert y.dtype == torch.float64 and y.device == x.device and torch.equal(y, x.double())
    m = torch.empty(2, device="meta")                    # another device keeps its own float64
    assert to_float64(m).device.type == "meta"


def test_no_float64_conversion_on_a_device_outside_the_helpers():
    """MPS has no float64: PyTorch raises on any float64 tensor there. Every ``.double()`` in the
    package therefore either follows ``.cpu()`` or is :func:`rnnlm.ops.to_float64` itself, which
    moves the tensor to the CPU first on such devices; and a float64 tensor made on a named device
    is made on one of the devices listed below, each reached only through ``float64_device``.
    (A source check: this machine has no MPS.)"""
    import re
    from pathlib import Path

    import rnnlm
    # float64 tensors made with device=...: where that device comes from
    allowed = {("cache.py", "device=device"),   # cache_nll: device = float64_device(device)
               ("sample.py", "device=cdf.device")}  # _draw*: the scores were moved to gen.device,
    bad = []                                         # float64_device(sampler's device), in Sampler._run
    for path in sorted(Path(rnnlm.__file__).parent.glob("*.py")):
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in re.finditer(r"\.double\(\)", code):
                before = code[:m.start()]
                if before.endswith(".cpu()") or (path.name == "ops.py" and code.strip() == "return t.double()"):
                    continue
                bad.append(f"{path.name}:{no}: {line.strip()}")
            if re.search(r"torch\.(float64|double)\b", code) and "device=" in code:
                named = re.findall(r"device=[\w.]+", code)
                if not all((path.name, d) in allowed for d in named):
                    bad.append(f"{path.name}:{no}: {line.strip()}")
    assert not bad, "float64 conversions that would fail on MPS:\n" + "\n".join(bad)


def test_the_cache_computes_on_the_cpu_when_asked_for_mps():
    """cache_nll(device="mps") never makes an MPS tensor (its float64 work is on the CPU), so it
    runs on a machine without one and gives the CPU's numbers."""
    from rnnlm.cache import CacheSpec, cache_nll
    g = torch.Generator().manual_seed(0)
    features, targets = torch.randn(300, 8, generator=g), torch.randint(0, 5, (300,), generator=g)
    nll = torch.rand(300, generator=g, dtype=torch.float64) * 3
    spec = CacheSpec(40, (0.5, 1.0), (0.1, 0.3))
    assert torch.equal(cache_nll(features, targets, nll, spec, device="mps"), cache_nll(features, targets, nll, spec))


def test_autocast_helpers_where_pytorch_has_no_autocast_for_the_device():
    """Older PyTorch versions have no autocast for MPS: making torch.autocast for it raises, even to turn it
    off, and so does asking whether it is on. The meta device behaves the same here, so it stands in."""
    from rnnlm.ops import autocast_enabled, no_autocast
    with pytest.raises(RuntimeError):
        torch.autocast("meta", enabled=False)
    with no_autocast("meta"):                         # nothing to turn off: an empty context
        assert not autocast_enabled("meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where autocast exists, it is turned off inside
        assert autocast_enabled("cpu")
        with no_autocast("cpu"):
            assert not autocast_enabled("cpu") and not torch.is_autocast_enabled("cpu")
        assert autocast_enabled("cpu")
