"""Model zoo: every cell, depth, bidirectional without leaks, tied and adaptive output layers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from rnnlm.config import ModelConfig, build_config
from rnnlm.evaluate import evaluate_ids
from rnnlm.models import RNNLM, auto_cutoffs, detach_state
from rnnlm.sample import Sampler
from rnnlm.text import Tokenizer, Vocab

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_peephole"]
V = 23


def _model(**kw) -> RNNLM:
    torch.manual_seed(0)
    args = dict(embedding_size=8, hidden_size=12, num_layers=1)
    args.update(kw)
    return RNNLM(V, ModelConfig(**args))


def _vocab() -> tuple[Vocab, Tokenizer]:
    chars = "abcdefghijklmnopqrstu"
    return Vocab(["<unk>", "<eos>", *chars]), Tokenizer(level="char", eos="line")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_trains_evaluates_and_samples(cell, layers, bidirectional):
    m = _model(cell=cell, num_layers=layers, bidirectional=bidirectional, dropout=0.1)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    x = torch.randint(2, V, (10, 3))
    states = [None, None]
    losses = []
    for _ in range(8):  # a few BPTT windows with the state carried
        loss = 0
        for d in range(m.num_directions):
            h, states[d] = m(x if d == 0 else x.flip(0), detach_state(states[d]), d)
            assert h.shape == (10, 3, m.out_dim)
            loss = loss + m.nll(h[:-1], (x if d == 0 else x.flip(0))[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        for st in states[: m.num_directions]:
            # (h, c) for LSTMs, a single tensor otherwise; each (L, B, H)
            tensors = st if isinstance(st, tuple) else (st,)
            assert len(tensors) == (2 if cell.startswith("lstm") else 1)
            assert all(t.shape == (layers, 3, 12) for t in tensors)
    assert losses[-1] < losses[0]  # it learns the repeated window
    res = evaluate_ids(m, np.random.RandomState(0).randint(2, V, 50))
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1
    assert ("forward_ppl" in res) == bidirectional
    vocab, tok = _vocab()
    s = Sampler(m, vocab, tok).generate("ab", num_samples=2, max_length=15, seed=1)
    assert len(s) == 2 and all(x.tokens <= 15 for x in s)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_direction_never_sees_the_future(cell):
    m = _model(cell=cell, num_layers=2, bidirectional=True).eval()
    T, t = 16, 7
    a = torch.randint(2, V, (T, 1))
    b = a.clone()
    b[t + 1:] = torch.randint(2, V, (T - t - 1, 1))  # change every token after position t
    assert not torch.equal(a, b)
    with torch.no_grad():
        ha, _ = m(a, None, 0)
        hb, _ = m(b, None, 0)
        # forward predictions made at positions <= t are unchanged
        assert torch.equal(m.log_probs(ha)[: t + 1], m.log_probs(hb)[: t + 1])
        assert not torch.equal(m.log_probs(ha)[t + 1:], m.log_probs(hb)[t + 1:])
        # mirrored: change tokens before position t; the backward stack reads the reversed text
        c = a.clone()
        c[:t] = torch.randint(2, V, (t, 1))
        ra, _ = m(a.flip(0), None, 1)
        rc, _ = m(c.flip(0), None, 1)
        # reversed index j is original position T-1-j; positions >= t are reversed indices <= T-1-t
        assert torch.equal(m.log_probs(ra)[: T - t], m.log_probs(rc)[: T - t])


def test_bidirectional_perplexity_not_below_the_source(tmp_path, monkeypatch):
    """Trained on i.i.d. text, neither direction beats the source's own perplexity (no leak)."""
    from rnnlm.train import Trainer
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    probs = {"a": 0.5, "b": 0.25, "c": 0.125, "d": 0.125}
    d = tmp_path / "iid"
    d.mkdir()
    for name, k in (("train", 30000), ("valid", 6000)):  # one line each: no newline to predict
        (d / f"{name}.txt").write_text("".join(rng.choices(list(probs), weights=list(probs.values()), k=k)))
    cfg = build_config(None, [f"data.path={d}", "data.eos=none", "model.bidirectional=true",
                              "model.hidden_size=16", "model.embedding_size=8", "model.num_layers=1",
                              "train.batch_size=16", "train.bptt=32", "train.max_steps=150", "train.lr=0.02",
                              "train.eval_every=null"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.fit()
    res = evaluate_ids(tr.model, tr.valid)
    source_ppl = math.exp(-sum(p * math.log(p) for p in probs.values()))  # 2^1.75 = 3.36
    for key in ("forward_ppl", "backward_ppl", "ppl"):
        assert res[key] >= source_ppl * 0.99, (key, res[key], source_ppl)
        assert res[key] <= source_ppl * 1.10, (key, res[key], source_ppl)  # and it did learn
    assert math.isclose(res["ppl"], math.sqrt(res["forward_ppl"] * res["backward_ppl"]), rel_tol=1e-9)


def test_tied_weights_share_the_matrix_with_a_projection():
    m = _model(tie_weights=True, embedding_size=8, hidden_size=12)
    assert m.decoder.weight is m.embedding.weight
    assert m.proj is not None and m.proj.weight.shape == (8, 12)
    same = _model(tie_weights=True, embedding_size=12, hidden_size=12)
    assert same.proj is None and same.decoder.weight is same.embedding.weight
    untied = _model(tie_weights=False)
    assert m.num_parameters() < untied.num_parameters() + 8 * 12


def test_head_layers_are_non_recurrent():
    m = _model(head_layers=2)
    assert len(m.head) == 4 and isinstance(m.head[0], torch.nn.Linear)
    x = torch.randint(0, V, (5, 2))
    h, _ = m(x)
    # Non-recurrent: the head maps each time step independently of the others
    with torch.no_grad():
        emb = m.embedding(x)
        out, _ = m.rnns[0](emb)
        assert torch.allclose(m.head(out), torch.stack([m.head(out[t]) for t in range(5)]))


def test_adaptive_softmax_is_a_normalised_exact_distribution():
    torch.manual_seed(0)
    m = RNNLM(500, ModelConfig(embedding_size=8, hidden_size=16, num_layers=1, softmax="adaptive",
                               adaptive_cutoffs=[20, 100]))
    h = torch.randn(6, 3, 16)
    lp = m.log_probs(h)
    assert lp.shape == (6, 3, 500)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(6, 3), atol=1e-5)
    y = torch.randint(0, 500, (6, 3))
    nll = m.nll(h, y, reduction="none")
    assert torch.allclose(nll.view(6, 3), -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.isclose(m.nll(h, y, reduction="sum"), nll.sum(), atol=1e-4)
    assert auto_cutoffs(33278) == [2000, 10000]
    assert auto_cutoffs(100) == [50]


def test_initialisation_options():
    m = _model(cell="lstm", init_range=0.05, forget_bias=1.0)
    H = 12
    for name, p in m.named_parameters():
        if name.endswith("bias_ih_l0"):
            assert torch.all(p[H:2 * H] == 1.0)
        elif name.endswith("bias_hh_l0"):
            assert torch.all(p[H:2 * H] == 0.0)
        else:
            assert p.abs().max() <= 0.05
    plain = _model(cell="gru", forget_bias=1.0)  # not an LSTM: untouched PyTorch default init
    assert plain.rnns[0].bias_ih_l0.abs().max() <= 1 / math.sqrt(12)
    default = _model(cell="lstm")  # the default (null): PyTorch's init, forget biases included
    H = 12
    for b in (default.rnns[0].bias_ih_l0, default.rnns[0].bias_hh_l0):
        assert b.abs().max() <= 1 / math.sqrt(H) and b[H:2 * H].abs().max() > 0


def test_dropout_keeps_the_expectation_and_is_identity_in_eval():
    from rnnlm.models import Dropout
    torch.manual_seed(0)
    d = Dropout(0.3)
    assert abs(d.rate - 0.3) <= 1e-4 * 0.3               # the realised rate, 2^-16 resolution
    x = torch.ones(200, 500)
    y = d(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - 0.3) < 0.01                      # the drop rate
    scale = 1 / (1 - d.rate)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], scale), rtol=0, atol=1e-6)  # inverted scaling
    assert abs(y.mean().item() - 1.0) < 0.02            # expectation kept
    x.requires_grad_()
    d(x).sum().backward()
    g = x.grad.unique()
    assert len(g) == 2 and g[0] == 0 and abs(g[1].item() - scale) < 1e-6
    d.eval()
    assert d(x) is x


@pytest.mark.parametrize("p, bits, k", [(0.2, 16, 13107), (0.5, 16, 32768), (0.25, 16, 16384), (0.65, 16, 42598),
                                        (0.01, 32, 42949673), (1e-6, 32, 4295)])
def test_dropout_mask_plan_known_answers(p, bits, k):
    """Rates realised to 2^-16 within 0.01 % use 16-bit draws; others 32-bit ones."""
    from rnnlm.models import keep_mask_plan
    got_bits, threshold, rate = keep_mask_plan(p)
    assert got_bits == bits
    assert threshold == k - 2 ** (bits - 1)             # signed: drop r < threshold, i.e. k of 2^bits values
    assert rate == k / 2 ** bits
    assert abs(rate - p) <= (1e-4 * p if bits == 16 else 2 ** -32)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.01])
def test_dropout_every_slice_of_a_draw_is_uniform(p):
    """Four 16-bit (or two 32-bit) masks come out of each 64-bit draw: each slot must drop at the
    rate, the top slot included (a generator giving 63-bit draws would bias it)."""
    from rnnlm.models import Dropout
    torch.manual_seed(1)
    d = Dropout(p)
    per = 64 // d.bits
    n = 400_000 * per
    dropped = (d(torch.ones(n)) == 0).view(-1, per).double()
    sd = math.sqrt(d.rate * (1 - d.rate) / (n // per))
    for slot in range(per):
        assert abs(dropped[:, slot].mean().item() - d.rate) < 5 * sd, slot
    # neighbouring elements are independent: P(both dropped) = rate^2
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()
    assert abs(both - d.rate ** 2) < 5 * math.sqrt(d.rate ** 2 * (1 - d.rate ** 2) / (n // per))


def test_dropout_is_reproducible_under_the_seed_and_works_in_bf16():
    from rnnlm.models import Dropout
    d = Dropout(0.2)
    x = torch.randn(35, 20, 7, dtype=torch.bfloat16)
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    b = d(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    kept = a != 0
    assert torch.equal(a[kept], x[kept] * 1.25)           # 1 / (1 - 0.19999695) rounds to 1.25 in bf16


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_layerwise_training_stack_equals_the_module(cell):
    """Training runs multi-layer stacks one layer per call with rnnlm's dropout between layers:
    without dropout it is the module's own forward; the mask lands between the layers."""
    from rnnlm.models import Dropout, make_rnn, run_layerwise
    torch.manual_seed(0)
    rnn = make_rnn(cell, 6, 5, 3, 0.0)
    x = torch.randn(7, 4, 6, requires_grad=True)
    state = None if cell != "lstm" else (torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    want, want_state = rnn(x, state)
    got, got_state = run_layerwise(rnn, x, state, Dropout(0.0))
    assert torch.allclose(got, want, atol=1e-6)
    for a, b in zip(got_state if cell == "lstm" else [got_state], want_state if cell == "lstm" else [want_state]):
        assert torch.allclose(a, b, atol=1e-6)
    got.sum().backward()                                   # gradients flow to the input and weights
    assert x.grad is not None and all(p.grad is not None for p in rnn.parameters())
    # a "dropout" that zeroes everything: the second layer of a 2-layer stack sees zeros, i.e. it
    # is that layer alone run on zero input
    rnn2 = make_rnn(cell, 6, 5, 2, 0.0)
    zeroed, _ = run_layerwise(rnn2, x, None, lambda t: t * 0)
    top = make_rnn(cell, 5, 5, 1, 0.0)
    with torch.no_grad():
        for name, p in top.named_parameters():
            p.copy_(getattr(rnn2, name[:-1] + "1"))
    ref, _ = top(torch.zeros(7, 4, 5), None)
    assert torch.allclose(zeroed, ref, atol=1e-6)


def test_dropout_off_cpu_is_pytorchs_fused_dropout(monkeypatch):
    """Devices with a parallel generator use F.dropout at the configured rate (one fused kernel on
    CUDA); exercised here on CPU by switching the sliced draws off."""
    import torch.nn.functional as F

    import rnnlm.models as M
    monkeypatch.setattr(M, "_sliced_draws", lambda device: False)
    d = M.Dropout(0.2)
    x = torch.rand(400, 1000) + 0.5
    torch.manual_seed(2)
    y = d(x)
    assert abs((y == 0).float().mean().item() - 0.2) < 0.005
    torch.manual_seed(2)
    assert torch.equal(y, F.dropout(x, 0.2, training=True))
    d.eval()
    assert d(x) is x


def test_dropout_rate_change_recomputes_the_mask_plan():
    from rnnlm.models import Dropout, keep_mask_plan
    d = Dropout(0.2)
    d.p = 0.01
    assert (d.bits, d.threshold, d.rate) == keep_mask_plan(0.01)
    torch.manual_seed(0)
    assert abs((d(torch.ones(1_000_000)) == 0).float().mean().item() - 0.01) < 0.001
    d.p = 0.0
    x = torch.ones(3)
    assert d(x) is x


@pytest.mark.parametrize("tie", [False, True])
def test_plain_gpu_loss_path_equals_the_fused_one(monkeypatch, tie):
    """On a GPU small output layers take F.linear + F.cross_entropy instead of the fused function
    (exercised here on CPU by switching that route on): the same loss and gradients in fp32, and
    an fp32 loss close to the fp32 one under bf16 autocast."""
    import rnnlm.models as M
    from rnnlm.config import ModelConfig
    torch.manual_seed(3)
    m = M.RNNLM(301, ModelConfig(hidden_size=24, embedding_size=16, num_layers=2, tie_weights=tie))
    x, y = torch.randint(0, 301, (9, 4)), torch.randint(0, 301, (9, 4))

    def loss_and_grads():
        loss = m.nll(m(x)[0], y)
        return loss, torch.autograd.grad(loss, list(m.parameters()))

    real = M._plain_loss
    assert not real(torch.device("cpu"), 10) and real(torch.device("cuda"), 10)
    assert not real(torch.device("cuda"), M.PLAIN_LOSS_MAX)
    fused, fused_g = loss_and_grads()
    monkeypatch.setattr(M, "_plain_loss", lambda device, n: True)
    plain, plain_g = loss_and_grads()
    torch.testing.assert_close(plain, fused, rtol=1e-6, atol=0)
    for a, b in zip(plain_g, fused_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = m.nll(m(x)[0], y)
    assert half.dtype == torch.float32 and abs(half.item() - fused.item()) < 2e-2
