"""Dynamic evaluation (rnnlm.dynamic): the update rule against a hand-written loop, and its place in evaluation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rnnlm.config import ModelConfig
from rnnlm.dynamic import DynamicSpec, dynamic_nll
from rnnlm.errors import UsageError
from rnnlm.evaluate import evaluate_ids, perplexity, stream_nll
from rnnlm.models import RNNLM, detach_state
from rnnlm.text import EOS_ID


def _model(V: int = 12, seed: int = 0, **kw) -> RNNLM:
    torch.manual_seed(seed)
    args = dict(cell="lstm", hidden_size=16, embedding_size=8, num_layers=2, dropout=0.3)
    args.update(kw)
    return RNNLM(V, ModelConfig(**args)).eval()


def _by_hand(model, ids, lr: float, decay: float, segment: int, direction: int = 0) -> float:
    """The definition with torch.optim.SGD on a copy: score a segment, then
    θ ← θ − lr·∇ + decay·(θ₀ − θ), both terms from the weights before the step."""
    m = copy.deepcopy(model).eval()
    theta0 = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    stream = [EOS_ID, *map(int, ids)]
    total, state = 0.0, None
    for s0 in range(0, len(ids), segment):
        seg = stream[s0:min(len(ids), s0 + segment) + 1]
        x, y = torch.tensor(seg[:-1]).view(-1, 1), torch.tensor(seg[1:])
        h, state = m(x, state, direction)
        lp = m.log_probs(h[:, 0])                           # (T, V) float32, the plain log-softmax
        nll = -lp[torch.arange(len(y)), y]
        total += float(nll.detach().sum())
        opt.zero_grad()
        nll.mean().backward()
        pulls = [(p0 - p.detach()) * decay for p, p0 in zip(m.parameters(), theta0)]
        opt.step()
        with torch.no_grad():
            for p, pull in zip(m.parameters(), pulls):
                p.add_(pull)
        state = detach_state(state)
    return total


@pytest.mark.parametrize("lr,decay,segment", [(0.5, 0.0, 7), (2.0, 0.1, 20), (1.0, 0.0, 1), (1.5, 1.0, 10)])
def test_dynamic_evaluation_is_the_definition(lr, decay, segment):
    model = _model()
    ids = np.random.default_rng(1).integers(0, 12, 90)
    want = _by_hand(model, ids, lr, decay, segment)
    got = dynamic_nll(model, ids, lr, decay, segment)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - stream_nll(model, ids)) > 0.05                     # it did adapt


def test_decay_one_steps_from_the_trained_weights_every_segment():
    # θ ← θ − lr·∇L(θ) + (θ₀ − θ) = θ₀ − lr·∇L(θ): each segment is scored by the trained weights
    # moved by the gradient the previous segment had under the weights that scored it.
    model = _model(seed=6)
    ids = np.random.default_rng(6).integers(0, 12, 40)
    got = dynamic_nll(model, ids, 2.0, decay=1.0, segment=10)
    theta0 = [p.detach().clone() for p in model.parameters()]
    m, want, state, stream = copy.deepcopy(model), 0.0, None, [EOS_ID, *map(int, ids)]
    for s0 in range(0, 40, 10):
        x, y = torch.tensor(stream[s0:s0 + 10]).view(-1, 1), torch.tensor(stream[s0 + 1:s0 + 11])
        h, state = m(x, state)
        nll = m.nll(h[:, 0], y, reduction="sum")
        want += float(nll.detach())
        grads = torch.autograd.grad(nll / 10, list(m.parameters()))
        with torch.no_grad():
            for p, p0, g in zip(m.parameters(), theta0, grads):
                p.copy_(p0 - 2.0 * g)
        state = detach_state(state)
    assert got == pytest.approx(want, rel=1e-5)


def test_lr_zero_is_the_static_number_and_the_model_is_left_as_it_was():
    model = _model(seed=2).train()
    before = copy.deepcopy(model.state_dict())
    ids = np.random.default_rng(2).integers(0, 12, 150)
    assert dynamic_nll(model, ids, 0.0, segment=13) == pytest.approx(stream_nll(model, ids), rel=1e-6)
    dynamic_nll(model, ids, 3.0, decay=0.05, segment=13)
    assert model.training and not model.embedding.sparse                # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                             # weights restored exactly
    assert all(p.grad is None for p in model.parameters())
    model.decoder.weight.requires_grad_(False)                          # a frozen weight adapts too,
    adapted = dynamic_nll(model, ids, 3.0, segment=13)                  # and stays frozen afterwards
    assert not model.decoder.weight.requires_grad and model.embedding.weight.requires_grad
    model.decoder.weight.requires_grad_(True)
    assert adapted == dynamic_nll(model, ids, 3.0, segment=13)
    want = _by_hand(model, ids, 3.0, 0.05, 13)
    with torch.inference_mode():                                        # callable from an inference context
        assert dynamic_nll(model, ids, 3.0, decay=0.05, segment=13) == pytest.approx(want, rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def boom(_):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        dynamic_nll(model, ids, 3.0, segment=13, progress=boom)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                             # even when interrupted


def test_a_repeated_text_is_learned_as_it_is_read():
    model = _model(seed=3, num_layers=1, hidden_size=32)
    ids = np.tile(np.array([3, 7, 1, 9, 4, 2]), 60)                      # a cycle the random model does not know
    static = stream_nll(model, ids) / len(ids)
    assert static > 2.0
    adapted = [dynamic_nll(model, ids, lr, segment=5) / len(ids) for lr in (0.3, 1.0, 3.0)]
    assert adapted[0] < static - 1.0 and adapted[2] < adapted[1] < adapted[0]   # learned, faster with larger steps


@pytest.mark.parametrize("kw", [dict(softmax="adaptive", adaptive_cutoffs=[4, 8]), dict(cell="lstm_peephole"),
                                dict(cell="gru", tie_weights=True, embedding_size=16), dict(head_layers=1),
                                dict(cell="rnn_tanh", tie_weights=True)])   # tied through a projection (8 ≠ 16)
def test_every_model_kind_adapts(kw):
    model = _model(seed=4, **kw)
    ids = np.random.default_rng(4).integers(0, 12, 60)
    assert dynamic_nll(model, ids, 0.0, segment=9) == pytest.approx(stream_nll(model, ids), rel=1e-6)
    want = _by_hand(model, ids, 0.7, 0.0, 9)
    assert dynamic_nll(model, ids, 0.7, segment=9) == pytest.approx(want, rel=1e-5)


def test_bidirectional_models_adapt_each_direction_from_the_trained_weights():
    model = _model(seed=5, bidirectional=True, num_layers=1)
    ids = np.random.default_rng(5).integers(0, 12, 70)
    out = evaluate_ids(model, ids, batch_size=3, dynamic=DynamicSpec((0.8, 0.0), segment=11))
    fwd = dynamic_nll(model, ids, 0.8, segment=11, direction=0) / len(ids)
    bwd = dynamic_nll(model, ids[::-1].copy(), 0.8, segment=11, direction=1) / len(ids)
    assert fwd * len(ids) == pytest.approx(_by_hand(model, ids, 0.8, 0.0, 11), rel=1e-5)
    assert bwd * len(ids) == pytest.approx(_by_hand(model, ids[::-1].copy(), 0.8, 0.0, 11, direction=1), rel=1e-5)
    e, e0 = out["dynamic"]
    assert (e["lr"], e["segment"], e["decay"]) == (0.8, 11, 0.0)
    assert e["forward_loss"] == pytest.approx(fwd, rel=1e-9) and e["backward_loss"] == pytest.approx(bwd, rel=1e-9)
    assert e["loss"] == pytest.approx((fwd + bwd) / 2, rel=1e-12) and e["ppl"] == math.exp(e["loss"])
    assert e0["loss"] == pytest.approx(out["loss"], rel=1e-6)


def test_spec_validation_and_perplexity_argument(tmp_path):
    for kw in (dict(lrs=()), dict(lrs=(-1.0,)), dict(lrs=(float("inf"),)), dict(lrs=(float("nan"),)),
               dict(lrs=("1",)), dict(lrs=(True,)), dict(lrs=(1.0,), decay=1.5), dict(lrs=(1.0,), decay=float("nan")),
               dict(lrs=(1.0,), segment=0), dict(lrs=(1.0,), segment=2.5), dict(lrs=(1.0,), decay=()),
               dict(lrs=(1.0,), decay=(0.1, 2.0)), dict(lrs=(1.0,), decay=(0.1, True)), dict(lrs=(1.0,), rms_eps=0),
               dict(lrs=(1.0,), rms_eps=()), dict(lrs=(1.0,), rms_eps=(0.3, float("inf")))):
        with pytest.raises(UsageError):
            DynamicSpec(**kw)
    assert DynamicSpec((1.0,), [0.0, 0.5]).decays == (0.0, 0.5) and DynamicSpec((1.0,), 0.25).decays == (0.25,)
    from rnnlm.text import EOS, UNK, Tokenizer, Vocab
    vocab, tok = Vocab([UNK, EOS, *"abc \n"]), Tokenizer(level="char", eos="line")
    path = tmp_path / "t.txt"
    path.write_text("abc ab\ncab\n")
    model = _model(V=len(vocab))
    with pytest.raises(UsageError, match="DynamicSpec"):
        perplexity(model, vocab, tok, path, dynamic=1.0)
    res = perplexity(model, vocab, tok, path, batch_size=2, dynamic=DynamicSpec((0.0, 1.0), segment=4))
    assert [e["lr"] for e in res["dynamic"]] == [0.0, 1.0]
    assert res["dynamic"][0]["loss"] == pytest.approx(res["loss"], rel=1e-6)
    assert all(e["bpc"] == e["bits_per_token"] for e in res["dynamic"])


def test_the_cache_on_top_of_dynamic_evaluation():
    from rnnlm.cache import CacheSpec, cache_nll
    model = _model(seed=7)
    ids = np.tile(np.random.default_rng(7).integers(0, 12, 50), 4)
    spec = CacheSpec(80, (0.5, 2.0), (0.0, 0.3))
    out = evaluate_ids(model, ids, batch_size=3, cache=spec, dynamic=DynamicSpec((0.0, 0.7), segment=9))
    static, adapted = out["dynamic"]
    for e, e0 in zip(static["cache"], out["cache"]):                    # lr 0: the static model's cache
        assert (e["theta"], e["lambda"]) == (e0["theta"], e0["lambda"])
        assert e["loss"] == pytest.approx(e0["loss"], rel=1e-6)
    collect: dict = {}
    total = dynamic_nll(model, ids, 0.7, segment=9, collect=collect)
    assert float(collect["nll"].sum()) == pytest.approx(total, rel=1e-12)
    want = cache_nll(collect["features"], torch.from_numpy(ids.astype(np.int64)), collect["nll"], spec)
    for e, (a, b) in zip(adapted["cache"], np.ndindex(2, 2)):
        assert e["loss"] == pytest.approx(float(want[a, b]) / len(ids), rel=1e-9)
        if e["lambda"] == 0.0:
            assert e["loss"] == pytest.approx(adapted["loss"], rel=1e-12)
    # the features collected are the adapting model's: they differ from the static ones
    static_collect: dict = {}
    stream_nll(model, ids, collect=static_collect)
    assert not np.allclose(collect["features"], static_collect["features"], atol=1e-3)


# -- the RMS rule ---------------------------------------------------------------------------------

def _rms_by_hand(model, ids, lr: float, decay: float, segment: int, rms: list[torch.Tensor], eps: float) -> float:
    """The RMS rule written out: θ ← θ − lr·g / (s + ε) + min(1, decay·s/s̄)·(θ₀ − θ), with s̄ the mean
    of s over every weight and ε = eps·s̄; dense gradients from a plain backward()."""
    m = copy.deepcopy(model).eval()
    theta0 = [p.detach().clone() for p in m.parameters()]
    mean = float(torch.cat([r.flatten().double() for r in rms]).mean())
    stream = [EOS_ID, *map(int, ids)]
    total, state = 0.0, None
    for s0 in range(0, len(ids), segment):
        s1 = min(len(ids), s0 + segment)
        x, y = torch.tensor(stream[s0:s1]).view(-1, 1), torch.tensor(stream[s0 + 1:s1 + 1])
        h, state = m(x, state)
        lp = m.log_probs(h[:, 0])
        nll = -lp[torch.arange(len(y)), y]
        total += float(nll.detach().sum())
        m.zero_grad()
        nll.mean().backward()
        with torch.no_grad():
            for p, p0, s in zip(m.parameters(), theta0, rms):
                step = -lr * p.grad / (s + eps * mean)
                pull = torch.clamp(decay * s / mean, max=1.0) * (p0 - p)
                p.add_(step + pull)
        state = detach_state(state)
    return total


def _random_rms(model, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in model.parameters():
        r = torch.rand(p.shape, generator=g) * 0.05
        r[torch.rand(p.shape, generator=g) < 0.1] = 0.0          # weights that never had a gradient
        out.append(r)
    return out


@pytest.mark.parametrize("lr,decay,segment,tie,eps", [(3e-3, 0.0, 7, False, 1e-3), (3e-3, 0.02, 20, False, 0.01),
                                                      (2e-3, 0.5, 10, True, 1e-3), (3e-4, 1.0, 1, False, 1e-3),
                                                      (3e-2, 0.1, 10, False, None)])
def test_rms_rule_is_the_definition(lr, decay, segment, tie, eps):
    from rnnlm.dynamic import RMS_EPS
    model = _model(seed=11, tie_weights=tie, embedding_size=16 if tie else 8)
    ids = np.random.default_rng(11).integers(0, 12, 80)
    rms = _random_rms(model, 3)
    want = _rms_by_hand(model, ids, lr, decay, segment, rms, RMS_EPS if eps is None else eps)
    kw = {} if eps is None else {"eps": eps}                      # None: the default, RMS_EPS
    got = dynamic_nll(model, ids, lr, decay, segment, rms=rms, **kw)   # sparse embedding rows, addcdiv elsewhere
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - stream_nll(model, ids)) > 0.05                     # it did adapt


def test_rms_rule_with_equal_statistics_is_the_sgd_rule():
    # s the same everywhere: s/s̄ = 1, so each step is lr / (s (1 + RMS_EPS)) times the gradient and
    # each weight is pulled back at the rate `decay` itself.
    from rnnlm.dynamic import RMS_EPS
    model = _model(seed=12)
    ids = np.random.default_rng(12).integers(0, 12, 60)
    s = 0.02
    rms = [torch.full_like(p, s) for p in model.parameters()]
    for decay in (0.0, 0.3):
        got = dynamic_nll(model, ids, 1e-3, decay, 9, rms=rms)
        assert got == pytest.approx(dynamic_nll(model, ids, 1e-3 / (s * (1 + RMS_EPS)), decay, 9), rel=1e-5)
        got = dynamic_nll(model, ids, 1e-3, decay, 9, rms=rms, eps=2.0)
        assert got == pytest.approx(dynamic_nll(model, ids, 1e-3 / (s * 3.0), decay, 9), rel=1e-5)


def test_rms_statistics_are_the_root_mean_square_of_the_step_gradients():
    from rnnlm.dynamic import gradient_rms, stats_layout
    model = _model(seed=13).train()                     # dropout on: the statistics must turn it off
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    ids = np.random.default_rng(13).integers(0, 12, 64)
    B, L = stats_layout(len(ids), 5, batch=3)
    assert (B, L) == (3, 21) and stats_layout(7, 5) == (1, 7) and stats_layout(400, 20) == (20, 20)
    got = gradient_rms(model, ids, segment=5, batch=3)
    # by hand: piece b reads stream[b*L : (b+1)*L] (the stream starting with <eos>), 5 tokens a step
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    stream = np.concatenate([[EOS_ID], ids])
    sums = [torch.zeros_like(p) for p in m.parameters()]
    state, steps = None, 0
    for s0 in range(0, L, 5):
        s1 = min(L, s0 + 5)
        x = torch.tensor(np.stack([stream[b * L + s0:b * L + s1] for b in range(B)], 1))
        y = torch.tensor(np.stack([stream[b * L + s0 + 1:b * L + s1 + 1] for b in range(B)], 1))
        h, state = m(x, state)
        lp = m.log_probs(h.reshape(-1, h.size(-1)))
        loss = -lp[torch.arange(y.numel()), y.reshape(-1)].mean()
        m.zero_grad()
        loss.backward()
        for acc, p in zip(sums, m.parameters()):
            acc += p.grad ** 2
        state, steps = detach_state(state), steps + 1
    assert steps == 5
    for r, acc in zip(got, sums):
        torch.testing.assert_close(r, (acc / steps).sqrt(), rtol=1e-4, atol=1e-7)
    assert all(float(r.max()) > 0 for r in got)
    # the model is as it was: weights, mode and the frozen weight's flag
    assert model.training and not frozen.requires_grad
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_rms_rule_in_evaluation_and_its_errors(tmp_path):
    from rnnlm.dynamic import gradient_rms
    model = _model(seed=14, bidirectional=True, num_layers=1)
    ids = np.random.default_rng(14).integers(0, 12, 70)
    train = np.random.default_rng(15).integers(0, 12, 500)
    out = evaluate_ids(model, ids, batch_size=2, dynamic=DynamicSpec((2e-4,), segment=10, rms_data=train))
    (e,) = out["dynamic"]
    assert e["rule"] == "rms" and DynamicSpec((1.0,)).rule == "sgd"
    rms_f = gradient_rms(model, train, 10, direction=0)
    rms_b = gradient_rms(model, train[::-1].copy(), 10, direction=1)         # the backward stack reads it reversed
    fwd = dynamic_nll(model, ids, 2e-4, 0.0, 10, direction=0, rms=rms_f) / len(ids)
    bwd = dynamic_nll(model, ids[::-1].copy(), 2e-4, 0.0, 10, direction=1, rms=rms_b) / len(ids)
    assert e["forward_loss"] == pytest.approx(fwd, rel=1e-9) and e["backward_loss"] == pytest.approx(bwd, rel=1e-9)
    with pytest.raises(UsageError, match="token ids"):
        evaluate_ids(model, ids, dynamic=DynamicSpec((1e-4,), rms_data=str(tmp_path / "train.txt")))
    for bad in (np.array([], dtype=np.int64), np.zeros((2, 3), dtype=np.int64), np.array([0.5, 1.5])):
        with pytest.raises(UsageError, match="rms_data"):
            evaluate_ids(model, ids, dynamic=DynamicSpec((1e-4,), rms_data=bad))
    with pytest.raises(UsageError, match="no gradient"):
        dynamic_nll(model, ids, 1e-4, rms=[torch.zeros_like(p) for p in model.parameters()])
    with pytest.raises(UsageError, match="do not match"):
        dynamic_nll(model, ids, 1e-4, rms=[torch.ones(3)])
    with pytest.raises(UsageError, match="eps"):
        dynamic_nll(model, ids, 1e-4, rms=rms_f, eps=0.0)
    # several ε values: one pass each, in the order of settings(); the SGD rule has none
    spec = DynamicSpec((2e-4,), (0.0, 0.1), 10, train, rms_eps=(0.3, 1.0))
    assert spec.settings() == [(2e-4, 0.0, 0.3), (2e-4, 0.0, 1.0), (2e-4, 0.1, 0.3), (2e-4, 0.1, 1.0)]
    assert DynamicSpec((1.0, 2.0), rms_eps=(0.3, 1.0)).settings() == [(1.0, 0.0, None), (2.0, 0.0, None)]
    out = evaluate_ids(model, ids, dynamic=spec)
    assert [(e["decay"], e["eps"]) for e in out["dynamic"]] == [(0.0, 0.3), (0.0, 1.0), (0.1, 0.3), (0.1, 1.0)]
    fwd = dynamic_nll(model, ids, 2e-4, 0.1, 10, direction=0, rms=rms_f, eps=1.0) / len(ids)
    assert out["dynamic"][3]["forward_loss"] == pytest.approx(fwd, rel=1e-9)


def test_a_bidirectional_models_forward_direction_adapts_as_the_same_unidirectional_model():
    # The backward stack gets no gradient from the forward reading: its statistics are None and
    # they do not enter s̄, so ε and the decay rates mean the same as for a one-direction model.
    from rnnlm.dynamic import gradient_rms
    uni, bi = _model(seed=17, num_layers=1), _model(seed=18, bidirectional=True, num_layers=1)
    shared = dict(uni.named_parameters())
    with torch.no_grad():
        for name, p in bi.named_parameters():
            if name in shared:
                p.copy_(shared[name])
    train = np.random.default_rng(17).integers(0, 12, 600)
    ids = np.random.default_rng(18).integers(0, 12, 60)
    rms_bi, rms_uni = gradient_rms(bi, train, 10), gradient_rms(uni, train, 10)
    names = [n for n, _ in bi.named_parameters()]
    assert [n for n, r in zip(names, rms_bi) if r is None] == [n for n in names if n.startswith("rnns.1.")]
    for r_bi, r_uni in zip([r for r in rms_bi if r is not None], rms_uni):
        torch.testing.assert_close(r_bi, r_uni)
    for decay in (0.0, 0.3):
        got = dynamic_nll(bi, ids, 3e-3, decay, 10, direction=0, rms=rms_bi)
        assert got == pytest.approx(dynamic_nll(uni, ids, 3e-3, decay, 10, rms=rms_uni), rel=1e-6)


def test_the_statistics_are_measured_once_per_direction_for_all_settings(monkeypatch):
    import rnnlm.evaluate as ev
    calls: list[int] = []
    real = ev.gradient_rms

    def counting(model, ids, segment, direction, *a, **kw):
        calls.append(direction)
        return real(model, ids, segment, direction, *a, **kw)

    monkeypatch.setattr(ev, "gradient_rms", counting)
    model = _model(seed=19, bidirectional=True, num_layers=1)
    ids, train = np.random.default_rng(19).integers(0, 12, 40), np.random.default_rng(20).integers(0, 12, 300)
    out = ev.evaluate_ids(model, ids, dynamic=DynamicSpec((1e-4, 3e-4), (0.0, 0.1), 10, train, (0.1, 1.0)))
    assert len(out["dynamic"]) == 8 and calls == [0, 1]
    calls.clear()
    ev.evaluate_ids(model, ids, dynamic=DynamicSpec((0.0,), 0.0, 10, train))     # lr 0 alone: nothing to measure
    assert calls == []
    with pytest.raises(UsageError, match="outside the vocabulary"):
        ev.evaluate_ids(model, ids, dynamic=DynamicSpec((1e-4,), rms_data=np.array([1, 2, 12])))


def test_perplexity_reads_the_rms_statistics_text(tmp_path):
    from rnnlm.text import EOS, UNK, Tokenizer, Vocab
    vocab, tok = Vocab([UNK, EOS, *"abc \n"]), Tokenizer(level="char", eos="line")
    path, train = tmp_path / "t.txt", tmp_path / "train.txt"
    path.write_text("abc ab\ncab\nbca\n")
    train.write_text("abcab cba\nbbc a\n" * 30)
    model = _model(V=len(vocab), seed=16)
    res = perplexity(model, vocab, tok, path, dynamic=DynamicSpec((0.0, 5e-4), segment=4, rms_data=train))
    assert [e["rule"] for e in res["dynamic"]] == ["rms", "rms"]
    assert res["dynamic"][0]["loss"] == pytest.approx(res["loss"], rel=1e-6)      # lr 0: the static model
    from rnnlm.data import TextSource, encode_source
    ids = encode_source(TextSource(path), tok, vocab, "utf-8", "strict")
    train_ids = encode_source(TextSource(train), tok, vocab, "utf-8", "strict")
    want = evaluate_ids(model, np.asarray(ids), dynamic=DynamicSpec((5e-4,), segment=4, rms_data=np.asarray(train_ids)))
    assert res["dynamic"][1]["loss"] == pytest.approx(want["dynamic"][0]["loss"], rel=1e-9)
    ticks: list[int] = []
    perplexity(model, vocab, tok, path, dynamic=DynamicSpec((5e-4,), segment=4, rms_data=train), progress=ticks.append)
    from rnnlm.dynamic import stats_layout
    B, L = stats_layout(len(train_ids), 4)
    assert sum(ticks) == 2 * len(ids) + B * L                         # plain pass, dynamic pass, statistics
    for missing, msg in ((tmp_path / "nope.txt", "not found"), (tmp_path, "not a regular file")):
        with pytest.raises(UsageError, match=msg):
            perplexity(model, vocab, tok, path, dynamic=DynamicSpec((1e-4,), rms_data=missing))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match="no tokens"):
        perplexity(model, vocab, tok, path, dynamic=DynamicSpec((1e-4,), rms_data=tmp_path / "empty.txt"))


def test_statistics_measured_once_serve_later_evaluations(monkeypatch):
    """rms_statistics measures per direction; the RMSStatistics given as rms_data give the numbers
    of measuring them inside the evaluation, and nothing is measured again."""
    import rnnlm.evaluate as ev
    from rnnlm.dynamic import RMSStatistics
    model = _model(seed=21, bidirectional=True, num_layers=1)
    ids, train = np.random.default_rng(21).integers(0, 12, 50), np.random.default_rng(22).integers(0, 12, 400)
    stats = ev.rms_statistics(model, train, 10)
    assert isinstance(stats, RMSStatistics) and stats.segment == 10 and stats.tokens == 400
    assert len(stats.per_direction) == 2
    want = ev.evaluate_ids(model, ids, dynamic=DynamicSpec((3e-4, 1e-3), 0.1, 10, train, (0.1, 0.5)))
    calls: list[int] = []
    monkeypatch.setattr(ev, "gradient_rms", lambda *a, **kw: calls.append(1))
    spec = DynamicSpec((3e-4, 1e-3), 0.1, 10, stats, (0.1, 0.5))
    assert spec.rule == "rms" and not spec.measures_rms
    got = ev.evaluate_ids(model, ids, dynamic=spec)
    assert calls == [] and got["dynamic"] == want["dynamic"]
    with pytest.raises(UsageError, match="10-token segments"):
        ev.evaluate_ids(model, ids, dynamic=DynamicSpec((3e-4,), segment=20, rms_data=stats))
    uni = _model(seed=21, num_layers=1)
    with pytest.raises(UsageError, match="2 reading direction"):
        ev.evaluate_ids(uni, ids, dynamic=DynamicSpec((3e-4,), segment=10, rms_data=stats))


def test_a_diverging_pass_stops_early_and_says_so():
    """A learning rate far too large makes the weights blow up: the pass stops at the first
    non-finite total instead of running to the end, the progress still reaches the text's length,
    the cache's NLLs are NaN from there, and the model is left as it was."""
    import math
    model = _model(seed=23)
    before = [p.detach().clone() for p in model.parameters()]
    ids = np.random.default_rng(23).integers(0, 12, 400)
    calls, ticks = [], []
    model.rnns[0].register_forward_hook(lambda *a: calls.append(1))
    collect: dict = {}
    got = dynamic_nll(model, ids, 1e38, segment=10, progress=ticks.append, collect=collect)  # weights overflow
    assert not math.isfinite(got)
    assert len(calls) < 40 and sum(ticks) == 400
    seen = len(calls) * 10
    assert torch.isnan(collect["nll"][seen:]).all() and torch.isfinite(collect["nll"][:10]).all()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    calls.clear()
    assert math.isfinite(dynamic_nll(model, ids, 1e-2, segment=10)) and len(calls) == 40   # a sane one runs through
