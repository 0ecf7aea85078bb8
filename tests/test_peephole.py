"""Tests of rnnlm.peephole.PeepholeLSTM against nn.LSTM and a plain-Python reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from rnnlm.peephole import PeepholeLSTM

PEEPHOLES = ("weight_ci", "weight_cf", "weight_co")


def _is_peephole(name: str) -> bool:
    return name.startswith(PEEPHOLES)


def _from_lstm(ref: nn.LSTM) -> PeepholeLSTM:
    """A PeepholeLSTM with ref's weights and zero peepholes (so it must equal ref)."""
    m = PeepholeLSTM(ref.input_size, ref.hidden_size, ref.num_layers, bias=ref.bias).to(ref.weight_ih_l0.dtype)
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f"{p}_l{k}" for k in range(ref.num_layers) for p in PEEPHOLES)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if _is_peephole(name):
                p.zero_()
    return m


# -- equivalence with nn.LSTM when the peepholes are zero -----------------------------------

@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_zero_peepholes_match_nn_lstm(num_layers, dtype, tol, bias):
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, 6
    ref = nn.LSTM(I, H, num_layers, bias=bias).to(dtype)
    m = _from_lstm(ref)
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(num_layers, B, H, dtype=dtype)
    c0 = torch.randn(num_layers, B, H, dtype=dtype)
    w = torch.randn(T, B, H, dtype=dtype)
    wh = torch.randn(num_layers, B, H, dtype=dtype)
    wc = torch.randn(num_layers, B, H, dtype=dtype)

    def run(mod):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        out, (hn, cn) = mod(xs, (hs, cs))
        loss = (out * w).sum() + (hn * wh).sum() + (cn * wc).sum()
        shared = [p for n, p in mod.named_parameters() if not _is_peephole(n)]
        grads = torch.autograd.grad(loss, [xs, hs, cs, *shared])
        return out, hn, cn, grads

    o1, h1, c1, g1 = run(ref)
    o2, h2, c2, g2 = run(m)
    torch.testing.assert_close(o2, o1, atol=tol, rtol=tol)
    torch.testing.assert_close(h2, h1, atol=tol, rtol=tol)
    torch.testing.assert_close(c2, c1, atol=tol, rtol=tol)
    names = ["x", "h0", "c0"] + [n for n, _ in ref.named_parameters()]
    assert len(g1) == len(g2) == len(names)
    for name, a, b in zip(names, g1, g2):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=lambda s, name=name: f"grad {name}: {s}")


def test_parameter_names_and_shapes():
    m = PeepholeLSTM(4, 3, num_layers=2)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    ref = {n: tuple(p.shape) for n, p in nn.LSTM(4, 3, 2).named_parameters()}
    for k in range(2):
        for p in PEEPHOLES:
            ref[f"{p}_l{k}"] = (3,)
    assert shapes == ref
    assert (m.input_size, m.hidden_size, m.num_layers, m.dropout) == (4, 3, 2, 0.0)
    bound = 1 / math.sqrt(3)
    for p in m.parameters():  # the peepholes too start U(-1/sqrt(H), 1/sqrt(H))
        assert p.abs().max() <= bound


# -- the peephole path against hand values and a plain-Python reference ----------------------

def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _python_reference(x, h0, c0, w_ih, w_hh, b, p_i, p_f, p_o):
    """One layer of the peephole LSTM, scalar by scalar, on nested lists."""
    H = len(h0)
    h, c, outs = list(h0), list(c0), []
    for x_t in x:
        z = [b[r] + sum(w_ih[r][j] * x_t[j] for j in range(len(x_t)))
             + sum(w_hh[r][j] * h[j] for j in range(H)) for r in range(4 * H)]
        i = [_sigmoid(z[j] + p_i[j] * c[j]) for j in range(H)]
        f = [_sigmoid(z[H + j] + p_f[j] * c[j]) for j in range(H)]
        g = [math.tanh(z[2 * H + j]) for j in range(H)]
        c = [f[j] * c[j] + i[j] * g[j] for j in range(H)]
        o = [_sigmoid(z[3 * H + j] + p_o[j] * c[j]) for j in range(H)]
        h = [o[j] * math.tanh(c[j]) for j in range(H)]
        outs.append(h)
    return outs, h, c


def test_known_answer_single_step_hidden_1():
    # x = 1, a<0> = 0, c<0> = 1; the weights make every gate pre-activation 0 (gate = 1/2)
    # only if the peepholes read c<0> for i, f and the *new* c<1> for o:
    #   Γi = σ(-0.5 + 0.5·c0) = 1/2,  Γf = σ(-1 + 1·c0) = 1/2,  c̃ = tanh(ln3 / 2) = 1/2,
    #   c<1> = 1/2·1 + 1/2·1/2 = 3/4,  Γo = σ(-1.5 + 2·c<1>) = 1/2,  a<1> = tanh(3/4) / 2.
    m = PeepholeLSTM(1, 1).double()
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.tensor([[-0.5], [-1.0], [math.log(3) / 2], [-1.5]], dtype=torch.float64))
        m.weight_hh_l0.fill_(0.7)  # multiplied by a<0> = 0
        m.bias_ih_l0.zero_()
        m.bias_hh_l0.zero_()
        m.weight_ci_l0.fill_(0.5)
        m.weight_cf_l0.fill_(1.0)
        m.weight_co_l0.fill_(2.0)
    x = torch.ones(1, 1, 1, dtype=torch.float64)
    state = (torch.zeros(1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64))
    out, (h, c) = m(x, state)
    assert c.item() == pytest.approx(0.75, abs=1e-12)
    assert out.item() == pytest.approx(0.5 * math.tanh(0.75), abs=1e-12)  # 0.3175744761936437
    assert h.item() == out.item()


def test_peephole_path_matches_python_reference():
    torch.manual_seed(1)
    T, B, I, H = 3, 2, 3, 2
    m = PeepholeLSTM(I, H).double()
    with torch.no_grad():  # large peepholes so that a wrong c<t> index would show
        m.weight_ci_l0.copy_(torch.tensor([0.9, -0.7]))
        m.weight_cf_l0.copy_(torch.tensor([-0.8, 0.6]))
        m.weight_co_l0.copy_(torch.tensor([1.1, -1.3]))
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    c0 = torch.randn(1, B, H, dtype=torch.float64)
    out, (hn, cn) = m(x, (h0, c0))
    params = [m.weight_ih_l0.tolist(), m.weight_hh_l0.tolist(),
              (m.bias_ih_l0 + m.bias_hh_l0).tolist(),
              m.weight_ci_l0.tolist(), m.weight_cf_l0.tolist(), m.weight_co_l0.tolist()]
    for b in range(B):
        outs, h, c = _python_reference(x[:, b].tolist(), h0[0, b].tolist(), c0[0, b].tolist(), *params)
        torch.testing.assert_close(out[:, b], torch.tensor(outs, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(hn[0, b], torch.tensor(h, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(cn[0, b], torch.tensor(c, dtype=torch.float64), atol=1e-12, rtol=0)


# -- shapes, state, dropout, gradients -----------------------------------------------------

def test_shapes_with_and_without_state():
    m = PeepholeLSTM(5, 7, num_layers=3)
    x = torch.randn(4, 2, 5)
    out, (h, c) = m(x)
    assert out.shape == (4, 2, 7) and h.shape == (3, 2, 7) and c.shape == (3, 2, 7)
    out2, (h2, c2) = m(x, (h, c))
    assert out2.shape == (4, 2, 7) and h2.shape == (3, 2, 7) and c2.shape == (3, 2, 7)
    torch.testing.assert_close(h[-1], out[-1], atol=0, rtol=0)
    with pytest.raises(ValueError):
        m(x, (h[:2], c))
    with pytest.raises(ValueError):
        m(torch.randn(4, 2, 6))


def test_zero_state_equals_none_and_carried_state_equals_one_pass():
    torch.manual_seed(2)
    m = PeepholeLSTM(3, 4, num_layers=2).double()
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    zeros = torch.zeros(2, 2, 4, dtype=torch.float64)
    out, (h, c) = m(x)
    out_z, _ = m(x, (zeros, zeros))
    torch.testing.assert_close(out_z, out, atol=0, rtol=0)
    a, s = m(x[:5])
    b, (h2, c2) = m(x[5:], s)
    torch.testing.assert_close(torch.cat((a, b)), out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h2, h, atol=1e-12, rtol=0)
    torch.testing.assert_close(c2, c, atol=1e-12, rtol=0)


def test_dropout_only_in_training_and_not_on_last_layer():
    torch.manual_seed(3)
    m = PeepholeLSTM(3, 16, num_layers=2, dropout=0.9)
    x = torch.randn(6, 4, 3)
    m.eval()
    e1, _ = m(x)
    e2, _ = m(x)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    m.train()
    t1, _ = m(x)
    t2, _ = m(x)
    assert not torch.equal(t1, e1) and not torch.equal(t1, t2)
    assert (t1 == 0).sum() == 0  # the last layer's output is not dropped
    m0 = PeepholeLSTM(3, 16, num_layers=2, dropout=0.0).train()
    m0.load_state_dict(m.state_dict())
    torch.testing.assert_close(m0(x)[0], e1, atol=0, rtol=0)
    with pytest.warns(UserWarning):
        PeepholeLSTM(3, 4, num_layers=1, dropout=0.5)


def test_gradients_reach_peephole_weights():
    torch.manual_seed(4)
    m = PeepholeLSTM(3, 4, num_layers=2)
    out, (h, c) = m(torch.randn(5, 2, 3), (torch.randn(2, 2, 4), torch.randn(2, 2, 4)))
    out.pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_float64():
    torch.manual_seed(5)
    m = PeepholeLSTM(3, 2, num_layers=2).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-6)


def test_double_backward_raises_instead_of_being_wrong():
    m = PeepholeLSTM(2, 2).double()
    x = torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)


def test_autocast_bfloat16():
    torch.manual_seed(6)
    m = PeepholeLSTM(8, 16, num_layers=2)
    x = torch.randn(5, 3, 8)
    state = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    ref, (h_ref, c_ref) = m(x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x, state)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)
    torch.testing.assert_close(c.float(), c_ref, atol=5e-2, rtol=0)
    (out.float().sum() + c.float().sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


# -- the fp32 CPU route through oneDNN (rnnlm.ops.step_matmul) ------------------------------

import rnnlm.ops as ops  # noqa: E402

needs_packed_onednn = pytest.mark.skipif(not ops._packed_weights_ok(),
                                         reason="oneDNN's packed fp32 linear is not available in this torch build")


def _forward_backward(m: PeepholeLSTM, x: torch.Tensor, state=None):
    x = x.clone().requires_grad_()
    out, (h, c) = m(x, state)
    (out.sin().sum() + (h * h).sum() + c.cos().sum()).backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad]
    m.zero_grad()
    return [out.detach(), h.detach(), c.detach()], grads


@needs_packed_onednn
@pytest.mark.parametrize("use_onednn", [True, False])
def test_fp32_per_step_matmuls_match_float64_with_and_without_onednn(use_onednn, monkeypatch):
    if not use_onednn:
        monkeypatch.setattr(ops, "_ONEDNN_PACKED", False)
    torch.manual_seed(3)
    m = PeepholeLSTM(24, 40, num_layers=2)
    x = torch.randn(12, 5, 24)
    state = (torch.randn(2, 5, 40) * 0.5, torch.randn(2, 5, 40) * 0.5)
    w = m.weight_hh_l0
    assert (ops.step_matmul(w, 5, 12) is not None) == use_onednn
    outs, grads = _forward_backward(m, x, state)
    m64 = PeepholeLSTM(24, 40, num_layers=2).double()
    m64.load_state_dict(m.state_dict())
    outs64, grads64 = _forward_backward(m64, x.double(), tuple(s.double() for s in state))
    for a, b in zip(outs + grads, outs64 + grads64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-6)


@needs_packed_onednn
def test_step_matmul_is_x_times_w_transposed_and_only_where_it_pays():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 32, generator=g), torch.randn(7, 32, generator=g)
    mm = ops.step_matmul(w, 7, steps=35)
    assert mm is not None
    torch.testing.assert_close(mm(x).double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-5)
    mt = ops.step_matmul(w.t(), 7, steps=35)           # a transposed (strided) weight: x @ w
    torch.testing.assert_close(mt(torch.randn(7, 64, generator=g)).shape, torch.Size([7, 32]))
    assert ops.step_matmul(w, 7, steps=4) is None        # too few steps to repay the packing
    assert ops.step_matmul(w.bfloat16(), 7, steps=35) is None
    assert ops.step_matmul(w.double(), 7, steps=35) is None


@needs_packed_onednn
def test_onednn_refusing_mid_sequence_falls_back_to_the_same_values(monkeypatch):
    torch.manual_seed(4)
    m = PeepholeLSTM(16, 24, num_layers=2)
    x = torch.randn(10, 3, 16)
    monkeypatch.setattr(ops, "_ONEDNN_PACKED", False)
    want_outs, want_grads = _forward_backward(m, x)      # torch.mm throughout
    monkeypatch.setattr(ops, "_ONEDNN_PACKED", True)
    monkeypatch.setattr(ops, "_ONEDNN_F32", True)
    real, calls = ops.linear_onednn, []

    def flaky(*args):                                    # works five times, then refuses
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("oneDNN refused")
        return real(*args)
    monkeypatch.setattr(ops, "linear_onednn", flaky)
    outs, grads = _forward_backward(m, x)
    assert ops._ONEDNN_F32 is False and len(calls) == 6  # switched off at the first refusal
    for a, b in zip(outs + grads, want_outs + want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
