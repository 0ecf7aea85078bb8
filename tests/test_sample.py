"""Sampling: every knob against a known answer or a brute-force computation.

Models with a known next-token distribution are built by hand:
* `fixed_model(p)`   -- decoder weight 0, decoder bias log p: the same distribution p at every step;
* `markov_model(M)`  -- a ReLU RNN whose hidden state is the one-hot of the previous token
  (identity embedding and input weights, no recurrence), so the logits are row M[prev].
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

import rnnlm.sample as sample_mod
from rnnlm import ops
from rnnlm.config import ModelConfig
from rnnlm.errors import UsageError
from rnnlm.models import RNNLM
from rnnlm.sample import Sample, Sampler, _Stepper, filter_log_probs
from rnnlm.text import EOS, EOS_ID, UNK, UNK_ID, Tokenizer, Vocab

CHARS = "abcdefghijklmnop"
NEVER = -1e4  # a logit that makes a token's probability exactly 0 in float32


def char_vocab(chars: str = CHARS) -> Vocab:
    return Vocab([UNK, EOS, *chars])


def random_model(V: int, cell: str = "lstm", seed: int = 0, **kw) -> RNNLM:
    torch.manual_seed(seed)
    args = dict(cell=cell, hidden_size=24, embedding_size=12, num_layers=2)
    args.update(kw)
    return RNNLM(V, ModelConfig(**args)).eval()


def fixed_model(probs: list[float]) -> RNNLM:
    """A model whose next-token distribution is `probs` whatever the context (0 -> never)."""
    m = RNNLM(len(probs), ModelConfig(hidden_size=4, embedding_size=4, num_layers=1))
    with torch.no_grad():
        m.decoder.weight.zero_()
        m.decoder.bias.copy_(torch.tensor([math.log(p) if p > 0 else NEVER for p in probs]))
    return m.eval()


def markov_model(logits: np.ndarray) -> RNNLM:
    """A model whose logits after token i are logits[i] (a (V, V) matrix)."""
    V = logits.shape[0]
    m = RNNLM(V, ModelConfig(cell="rnn_relu", hidden_size=V, embedding_size=V, num_layers=1))
    with torch.no_grad():
        m.embedding.weight.copy_(torch.eye(V))
        rnn = m.rnns[0]
        rnn.weight_ih_l0.copy_(torch.eye(V))
        rnn.weight_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
        m.decoder.weight.copy_(torch.as_tensor(logits, dtype=torch.float32).t())
        m.decoder.bias.zero_()
    return m.eval()


def sampler(model, vocab=None, level="char", eos="line") -> Sampler:
    return Sampler(model, vocab or char_vocab(), Tokenizer(level=level, eos=eos))


# -- chi-square ----------------------------------------------------------------------------------

def chi2_sf(x: float, k: int) -> float:
    """P(X >= x) for X ~ chi-square with k degrees of freedom: Q(k/2, x/2), the regularized upper
    incomplete gamma function (series below a + 1, Lentz's continued fraction above)."""
    a, z = k / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # P(a, z) by its series, Q = 1 - P
        term = total = 1.0 / a
        n = a
        while term > total * 1e-15:
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    f = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        f *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * f


def chi2_pvalue(x: float, k: int) -> float:
    """scipy's chi-square survival function when installed, else the implementation above."""
    try:
        from scipy.stats import chi2
    except ImportError:  # pragma: no cover - scipy is optional
        return chi2_sf(x, k)
    return float(chi2.sf(x, k))


def chi2_gof(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Pearson's goodness-of-fit statistic of `counts` against `probs`, and its p-value."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat, chi2_pvalue(stat, len(counts) - 1)


def chi2_homogeneity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson's test that two count vectors come from the same distribution (a 2 x k table)."""
    table = np.stack([a, b]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return stat, chi2_pvalue(stat, table.shape[1] - 1)


@pytest.mark.parametrize("x,k,p", [(3.841458820694124, 1, 0.05), (18.307038053275146, 10, 0.05),
                                   (9.487729036781154, 4, 0.05), (13.276704135987622, 4, 0.01),
                                   (18.466826952903173, 4, 0.001), (0.5, 3, 0.9188914116546758),
                                   (40.0, 5, 1.493367900050393e-07)])
def test_chi2_survival_function_known_values(x, k, p):
    # Critical values of the standard chi-square table; the last two from scipy.stats.chi2.sf.
    assert chi2_sf(x, k) == pytest.approx(p, rel=1e-6)


def test_chi2_survival_function_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k in (1, 2, 3, 4, 7, 20, 99):
        for x in (0.01, 0.3, 1.0, k - 0.5, k + 0.5, 2.0 * k, 5.0 * k + 10):
            assert chi2_sf(x, k) == pytest.approx(float(stats.chi2.sf(x, k)), rel=1e-8, abs=1e-300)


# -- the distribution ----------------------------------------------------------------------------

def random_log_probs(rng: np.random.Generator, B: int, V: int) -> torch.Tensor:
    conc = rng.choice([0.1, 0.5, 1.0, 5.0])
    p = rng.dirichlet(np.full(V, conc), size=B) + 1e-12
    return torch.log(torch.tensor(p / p.sum(1, keepdims=True), dtype=torch.float32))


def brute_force(logp: np.ndarray, temperature: float, top_k: int, top_p: float, allow_unk: bool) -> np.ndarray:
    """The sampled distribution by the definition, one row at a time in float64."""
    p = np.exp(logp.astype(np.float64))
    if not allow_unk:
        p[UNK_ID] = 0
    p = p ** (1 / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = [i for i in order if p[i] > 0]
    if top_k:
        keep = keep[:top_k]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    if top_p < 1:
        mass, nucleus = 0.0, []
        for i in keep:  # most probable first, until the mass reaches p
            nucleus.append(i)
            mass += q[i]
            if mass >= top_p:
                break
        r = np.zeros_like(q)
        r[nucleus] = q[nucleus] / q[nucleus].sum()
        q = r
    return q


def test_filter_matches_brute_force_on_random_distributions():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(300):
        V = int(rng.integers(3, 40))
        logp = random_log_probs(rng, 4, V)
        temperature = float(rng.choice([1.0, 0.5, 2.0, rng.uniform(0.2, 3)]))
        top_k = int(rng.choice([0, 1, 2, 5, V - 1, V, V + 3]))
        top_p = float(rng.choice([1.0, rng.uniform(0.01, 1.0), rng.uniform(0.9, 1.0)]))
        allow_unk = bool(rng.integers(2))
        out_log = filter_log_probs(logp, temperature, top_k, top_p, allow_unk)
        kept = torch.isfinite(out_log).numpy()   # (the log survives where exp underflows float32)
        out = out_log.exp().double().numpy()
        for b in range(4):
            want = brute_force(logp[b].numpy(), temperature, top_k, top_p, allow_unk)
            # Skip the measure-zero cases where p lies within float rounding of a cumulative mass.
            q = np.sort(brute_force(logp[b].numpy(), temperature, top_k, 1.0, allow_unk))[::-1]
            if top_p < 1 and np.min(np.abs(np.cumsum(q) - top_p)) < 1e-6:
                continue
            np.testing.assert_array_equal(kept[b], want > 0, err_msg=f"trial {trial} row {b}")
            np.testing.assert_allclose(out[b], want, rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked > 1000


def test_top_k_keeps_exactly_k_most_probable():
    rng = np.random.default_rng(1)
    logp = random_log_probs(rng, 64, 30)
    for k in (1, 2, 7, 28, 29, 30, 100):
        out = filter_log_probs(logp, top_k=k)
        kept = torch.isfinite(out)
        assert (kept.sum(1) == min(k, 29)).all()            # UNK is removed first, then k kept
        assert not kept[:, UNK_ID].any()
        without_unk = logp.clone()
        without_unk[:, UNK_ID] = -math.inf
        kth = torch.topk(without_unk, min(k, 29), dim=1).values[:, -1:]
        assert (kept == (without_unk >= kth)).all()
        assert torch.allclose(out.exp().sum(1), torch.ones(64))


def test_top_p_keeps_smallest_set_reaching_p():
    rng = np.random.default_rng(2)
    for _ in range(200):
        V = int(rng.integers(3, 50))
        p = float(rng.uniform(0.05, 0.999))
        logp = random_log_probs(rng, 1, V)
        out = filter_log_probs(logp, top_p=p, allow_unk=True)[0]
        probs = logp[0].double().exp()
        probs /= probs.sum()
        kept = torch.isfinite(out)
        mass = float(probs[kept].sum())
        smallest_outside = float(probs[~kept].max()) if (~kept).any() else 0.0
        assert mass >= p - 1e-6                                        # reaches p ...
        assert mass - float(probs[kept].min()) < p + 1e-6              # ... and no token could go
        assert float(probs[kept].min()) >= smallest_outside            # the most probable ones


def test_temperature_definition_and_zero_is_greedy():
    rng = np.random.default_rng(3)
    logp = random_log_probs(rng, 8, 12)
    for t in (0.25, 1.0, 3.0):
        want = logp.clone()
        want[:, UNK_ID] = -math.inf
        want = torch.log_softmax(want / t, 1)
        assert torch.allclose(filter_log_probs(logp, temperature=t), want, atol=1e-5)
    greedy = filter_log_probs(logp, temperature=0)
    masked = logp.clone()
    masked[:, UNK_ID] = -math.inf
    assert (greedy.argmax(1) == masked.argmax(1)).all()
    assert (torch.isfinite(greedy).sum(1) == 1).all() and (greedy.max(1).values == 0).all()


def test_sorted_candidates_are_the_filtered_distribution():
    """The sampler draws top-k/top-p samples among sorted candidates; they carry exactly the
    distribution filter_log_probs defines (same kept set, same probabilities)."""
    from rnnlm.sample import _candidates
    rng = np.random.default_rng(5)
    for trial in range(200):
        V = int(rng.integers(3, 40))
        logp = random_log_probs(rng, 4, V)
        temperature = float(rng.choice([1.0, 0.5, 2.0]))
        top_k = int(rng.choice([0, 1, 2, 5, V - 1, V, V + 3]))
        top_p = float(rng.choice([1.0, rng.uniform(0.01, 1.0), rng.uniform(0.9, 1.0)]))
        if top_k == 0 and top_p == 1.0:
            continue
        scores = logp.clone()
        scores[:, UNK_ID] = -math.inf                                    # as step.scores() gives them
        probs, ids = _candidates(scores / temperature, top_k, top_p)
        got = torch.zeros(4, V, dtype=torch.float64).scatter_(1, ids, probs / probs.sum(1, keepdim=True))
        want = filter_log_probs(logp, temperature, top_k, top_p).double().exp()
        assert torch.equal(got > 0, want > 0), trial
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9), trial


def test_top_k_top_p_sampling_chi_square():
    """20,000 one-token samples with top-k 4 and top-p 0.8 follow the filtered distribution."""
    vocab = char_vocab("abcde")
    probs = [0.05, 0.1, 0.3, 0.25, 0.15, 0.1, 0.05]                      # <unk>, <eos>, a..e
    s = sampler(fixed_model(probs), vocab)
    got = s.generate("", 20_000, 1, top_k=4, top_p=0.8, seed=7)
    c = Counter(x.generated if x.stop == "length" else "<eos>" for x in got)
    # top-4 of the distribution without <unk>: a .3, b .25, c .15 and one of <eos>/d (.1), renormalised
    # a .375, b .3125, c .1875, .125; top-p 0.8 keeps a, b, c (the 4th has .875 >= 0.8 before it)
    expected = np.array([0.3, 0.25, 0.15]) / 0.7
    counts = np.array([c["a"], c["b"], c["c"]])
    assert sum(c.values()) == counts.sum()                             # nothing outside the nucleus
    stat, p = chi2_gof(counts, expected)
    assert p > 1e-3, (stat, counts, expected * 20_000)


def test_a_single_sample_with_top_k_top_p_draws_from_the_filtered_distribution():
    """The same filter for one 20,000-token sample (batch 1: :func:`_draw_few` over Python floats),
    <eos> never: top-k 4 keeps a, b, c, d; top-p 0.8 then a, b, c (.375 + .3125 < .8 before c)."""
    probs = [0.05, 0.0, 0.3, 0.25, 0.15, 0.1, 0.05]                       # <unk>, <eos>, a..e
    s = sampler(fixed_model(probs), char_vocab("abcde"))
    text = s.generate("", 1, 20_000, top_k=4, top_p=0.8, seed=7)[0].generated
    counts = np.array([text.count(ch) for ch in "abc"])
    assert counts.sum() == len(text) == 20_000
    expected = np.array([0.3, 0.25, 0.15]) / 0.7
    stat, p = chi2_gof(counts, expected)
    assert p > 1e-3, (stat, counts, expected * 20_000)
    assert chi2_gof(counts, np.array([0.3, 0.25, 0.15 + 0.1]) / 0.8)[1] < 1e-9   # d kept: rejected


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (1, 1.0), (5, 1.0), (40, 0.9), (40, 0.3), (0, 1e-4),
                                         (60, 0.999), (64, 0.5)])
def test_draw_few_is_the_tensor_draw(top_k, top_p):
    """_draw_few (Python floats) gives the very token _candidates + _draw_candidates give for the same
    uniform number, with -inf scores among the candidates, and never one of them; a seeded single
    sample is the same text whether its draws take the Python path or the tensor path."""
    g = torch.Generator().manual_seed(top_k + int(top_p * 1000))
    for trial in range(300):
        scores = torch.randn(1, 64, generator=g) * (0.3 + trial % 5)
        scores[0, :3] = float("-inf")
        seed = 1000 + trial
        u = sample_mod._Uniforms(torch.Generator().manual_seed(seed))()
        want = sample_mod._draw_candidates(*sample_mod._candidates(scores, top_k, top_p),
                                           torch.Generator().manual_seed(seed))
        got = sample_mod._draw_few(scores, top_k, top_p, u)
        assert torch.equal(got, want) and int(got) >= 3, (trial, got, want)


def test_single_sample_texts_do_not_depend_on_the_draw_path(monkeypatch):
    """The same seed gives the same single-sample text through Python floats and through tensors."""
    s = sampler(random_model(len(char_vocab()), seed=4))
    kw = [dict(top_k=5, top_p=0.9, temperature=1.3), dict(top_p=0.8), dict(top_k=3)]
    fast = [s.generate("ab", 1, 300, seed=9, **k)[0].text for k in kw]
    monkeypatch.setattr(sample_mod, "_FEW_CANDIDATES", 0)
    assert [s.generate("ab", 1, 300, seed=9, **k)[0].text for k in kw] == fast
    assert len(set(fast)) == 3


# -- the fast path is the model ------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_peephole"])
@pytest.mark.parametrize("extra", [{}, {"head_layers": 1, "tie_weights": True}, {"softmax": "adaptive"}])
def test_stepper_equals_the_model_forward(cell, extra):
    V = 140 if extra.get("softmax") else 30
    m = random_model(V, cell, **extra)
    ctx, nxt = [EOS_ID, 5, 7, 3], torch.tensor([4, 9, 2])
    with torch.inference_mode():
        step = _Stepper(m, torch.device("cpu"))
        step.start(ctx, 3)
        step.advance(nxt)
        got = torch.log_softmax(step.scores(), -1)
        x = torch.cat([torch.tensor(ctx).unsqueeze(1).expand(-1, 3), nxt.unsqueeze(0)])
        h, _ = m(x)
        want = m.log_probs(h[-1])
    assert torch.allclose(got, want, atol=1e-5)


def _force_product(monkeypatch, kind: str, parts: int = 1):
    """Make rnnlm.sample._product pick `kind` for every matrix: "blocks" (_Gemv over `parts`
    threads), "packed" (oneDNN) or "addmm"."""
    if kind == "packed" and not ops._packed_weights_ok():
        pytest.skip("oneDNN's packed linear is unavailable or failed its check in this PyTorch build")
    monkeypatch.setattr(sample_mod, "_parts", lambda device: parts)
    monkeypatch.setattr(sample_mod, "_PACK_MIN_ENTRIES", 1 << 40 if kind == "addmm" else 0)
    monkeypatch.setattr(sample_mod, "_packed_weights_ok", lambda: kind == "packed")
    return {"blocks": sample_mod._Gemv, "packed": sample_mod._Packed, "addmm": sample_mod._Addmm}[kind]


PRODUCTS = [("blocks", 1), ("blocks", 2), ("blocks", 3), ("blocks", 5), ("packed", 1), ("addmm", 1)]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_peephole"])
@pytest.mark.parametrize("kind,parts", PRODUCTS)
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_split_stack_equals_the_model_over_many_steps(cell, kind, parts, table, layers, monkeypatch):
    """The fast paths (each kind of product: row blocks over `parts` threads, oneDNN's packed
    weights, one addmm; with and without layer 0's token table) follow model.forward token after
    token, batch of 3 and then batch of 1 (which takes row blocks where it would take oneDNN)."""
    cls = _force_product(monkeypatch, kind, parts)
    if not table:
        monkeypatch.setattr(sample_mod, "_TABLE_MAX_ENTRIES", 0)
    m = random_model(31, cell, num_layers=layers, seed=parts)
    ctx = [EOS_ID, 5, 7, 3]
    steps = torch.tensor([[4, 9, 2], [30, 1, 6], [8, 8, 8], [2, 3, 29]])
    with torch.inference_mode():
        for batch in (3, 1):
            step = _Stepper(m, torch.device("cpu"), batch)
            assert step.stack is not None and (step.table is not None) == table
            want = sample_mod._Gemv if (kind == "packed" and batch == 1) else cls  # oneDNN from batch 2 on
            products = [step.decoder, *getattr(step.stack, "gemvs", []), *getattr(step.stack, "hh", []),
                        *(p for p in getattr(step.stack, "ih", []) if p is not None)]
            assert len(products) > layers and all(type(p) is want for p in products)
            assert want is not sample_mod._Gemv or all(p.P == min(parts, p.N) for p in products)
            step.start(ctx, batch)
            x = torch.tensor(ctx).unsqueeze(1).expand(-1, batch)
            for nxt in steps[:, :batch]:
                step.advance(nxt)
                x = torch.cat([x, nxt.unsqueeze(0)])
                h, _ = m(x)
                assert torch.allclose(torch.log_softmax(step.scores(), -1), m.log_probs(h[-1]), atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_peephole"])
@pytest.mark.parametrize("kind,parts", [("blocks", 2), ("packed", 1), ("addmm", 1)])
@pytest.mark.parametrize("table", [True, False])
def test_stacks_rebind_their_buffers_to_each_new_state(cell, kind, parts, table, monkeypatch):
    """The LSTM, GRU and peephole stacks compute in buffers of their own: one stepper started again
    and again, at batches 3, 1 and 2, follows the model each time; the state's tensors are updated
    in place (the same objects after a step), and a state handed in from outside is copied, never
    written to."""
    _force_product(monkeypatch, kind, parts)
    if not table:
        monkeypatch.setattr(sample_mod, "_TABLE_MAX_ENTRIES", 0)
    m = random_model(31, cell, num_layers=3, seed=7)
    steps = torch.tensor([[4, 9, 2], [30, 1, 6], [8, 8, 8]])

    def ids_of(state):
        return [tuple(map(id, s)) if isinstance(s, tuple) else id(s) for s in state]

    with torch.inference_mode():
        step = _Stepper(m, torch.device("cpu"), 3)
        assert isinstance(step.stack, sample_mod._Buffered) and (step.table is not None) == table
        in_place = 0
        for batch, ctx in ((3, [EOS_ID, 5, 7, 3]), (1, [EOS_ID, 2]), (2, [EOS_ID, 11, 12, 13, 14])):
            step.start(ctx, batch)
            x = torch.tensor(ctx).unsqueeze(1).expand(-1, batch)
            for nxt in steps[:, :batch]:
                bound, before = step.stack._state is step.state, ids_of(step.state)
                step.advance(nxt)
                if bound:
                    assert ids_of(step.state) == before
                    in_place += 1
                x = torch.cat([x, nxt.unsqueeze(0)])
                h, _ = m(x)
                assert torch.allclose(torch.log_softmax(step.scores(), -1), m.log_probs(h[-1]), atol=1e-5)
        assert in_place >= 4
        # a state from outside: its tensors are read, not written
        _, st = m(torch.tensor([[EOS_ID], [4]]))
        parts_ = st if isinstance(st, tuple) else (st,)
        mine = [tuple(p[k].clone() for p in parts_) for k in range(3)]
        mine = [t if len(t) == 2 else t[0] for t in mine]
        kept = [tuple(t.clone() for t in s) if isinstance(s, tuple) else s.clone() for s in mine]
        step.state = list(mine)
        step.advance(torch.tensor([9]))
        flat = [t for s in mine for t in (s if isinstance(s, tuple) else (s,))]
        flat_kept = [t for s in kept for t in (s if isinstance(s, tuple) else (s,))]
        assert all(torch.equal(a, b) for a, b in zip(flat, flat_kept))
        h, _ = m(torch.tensor([[EOS_ID], [4], [9]]))
        assert torch.allclose(torch.log_softmax(step.scores(), -1), m.log_probs(h[-1]), atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "lstm_peephole"])
def test_a_long_context_is_run_by_the_model_and_then_stepped(cell):
    """A context longer than _STEP_PRIME_MAX goes through the model in one call; its state is then
    broadcast to the batch and taken over by the stack: the steps after it still follow the model."""
    m = random_model(31, cell, seed=11)
    g = torch.Generator().manual_seed(3)
    ctx = [EOS_ID] + torch.randint(2, 31, (sample_mod._STEP_PRIME_MAX + 15,), generator=g).tolist()
    with torch.inference_mode():
        step = _Stepper(m, torch.device("cpu"), 2)
        step.start(ctx, 2)
        x = torch.tensor(ctx).unsqueeze(1).expand(-1, 2)
        for nxt in torch.tensor([[4, 9], [30, 1], [8, 8]]):
            step.advance(nxt)
            x = torch.cat([x, nxt.unsqueeze(0)])
            h, _ = m(x)
            assert torch.allclose(torch.log_softmax(step.scores(), -1), m.log_probs(h[-1]), atol=1e-5)


@pytest.mark.parametrize("N,K,B,parts", [(12, 5, 1, 1), (12, 5, 1, 4), (13, 7, 3, 4), (7, 3, 2, 9), (1, 4, 1, 2)])
@pytest.mark.parametrize("kind", ["blocks", "packed", "addmm"])
def test_products_equal_linear(N, K, B, parts, kind, monkeypatch):
    """Each kind of product is F.linear, with its own bias, a bias given per call, and per-row
    biases looked up from a table split for it (as layer 0's token table is)."""
    cls = _force_product(monkeypatch, kind, parts)
    g = torch.Generator().manual_seed(N * K + parts)
    w, b, x = (torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(B, K, generator=g))
    prod = sample_mod._product(w, b, torch.device("cpu"), batch=2)
    assert type(prod) is cls
    if kind == "blocks":
        assert prod.P == min(parts, N)
    assert prod(x).shape == (B, N)
    assert torch.allclose(prod(x), torch.nn.functional.linear(x, w, b), atol=1e-5)
    other = torch.randn(N, generator=g)
    assert torch.allclose(prod(x, prod.split(other)), x @ w.t() + other, atol=1e-5)
    table = torch.randn(6, N, generator=g)                     # per-token biases, as the token table gives
    ids = torch.randint(0, 6, (B,), generator=g)
    assert torch.allclose(prod(x, prod.rows(prod.split(table), ids)), x @ w.t() + table[ids], atol=1e-5)
    # written into a given tensor (as the LSTM stack's gate buffers take it): the same numbers, in place
    for bias in (None, prod.split(other), prod.rows(prod.split(table), ids)):
        out = torch.full((B, N), float("nan"))
        ptr = out.data_ptr()
        prod.into(out, x, bias)
        assert torch.equal(out, prod(x, bias)) and out.data_ptr() == ptr
    # bound to buffers that stay the same tensors: x changed in place between calls is read afresh
    xb, out = x.clone(), torch.empty(B, N)
    run = prod.bound(xb, out)
    run()
    assert torch.equal(out, prod(xb))
    xb.mul_(-2)
    run(prod.split(other))
    assert torch.equal(out, prod(xb, prod.split(other)))
    rows = prod.rows_into(prod.split(table), B)
    for _ in range(2):
        assert torch.equal(rows(ids), prod.rows(prod.split(table), ids))
        ids = ids.flip(0)


@pytest.mark.parametrize("kind,parts", [("blocks", 1), ("blocks", 3), ("packed", 1), ("addmm", 1)])
@pytest.mark.parametrize("head_bias", [False, True])
def test_adaptive_scores_equal_the_modules_log_prob(kind, parts, head_bias, monkeypatch):
    """The sampler's adaptive softmax (head and tails through its own products) gives the module's
    full log-distribution: shortlist, two clusters, with and without a head bias, batch 3 and 1."""
    cls = _force_product(monkeypatch, kind, parts)
    m = random_model(140, softmax="adaptive", adaptive_cutoffs=[20, 70], seed=parts)
    if head_bias:
        old = m.softmax.head
        m.softmax.head = torch.nn.Linear(old.in_features, old.out_features)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for batch in (3, 1):
            step = _Stepper(m, torch.device("cpu"), batch)
            want = sample_mod._Gemv if (kind == "packed" and batch == 1) else cls
            products = [step.adaptive.head, *(p for pair in step.adaptive.tails for p in pair)]
            assert len(products) == 5 and all(type(p) is want for p in products)
            h = torch.randn(batch, m.out_dim, generator=g)
            assert torch.allclose(step.adaptive(h), m.softmax.log_prob(h), atol=1e-5)


def test_products_are_chosen_by_size(monkeypatch):
    """On CPU: small matrices by addmm; large ones by row blocks at batch 1, and by oneDNN at larger
    batches where it passed its check (else row blocks); on other devices always row blocks."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(sample_mod, "_packed_weights_ok", lambda: True)
    small, large = torch.randn(3, 4), torch.randn(512, 512)
    for batch in (1, 2, 16):
        assert type(sample_mod._product(small, None, cpu, batch)) is sample_mod._Addmm
    assert type(sample_mod._product(large, None, cpu, 1)) is sample_mod._Gemv
    if ops._packed_weights_ok():
        assert type(sample_mod._product(large, None, cpu, 2)) is sample_mod._Packed
    if ops._packed_weights_ok():                       # a oneDNN that miscomputes this matrix: row blocks
        monkeypatch.setattr(sample_mod, "linear_onednn", lambda x, w, b=None: torch.zeros(x.size(0), w.size(0)))
        assert type(sample_mod._product(large, torch.randn(512), cpu, 2)) is sample_mod._Gemv
    monkeypatch.setattr(sample_mod, "_packed_weights_ok", lambda: False)
    assert type(sample_mod._product(large, None, cpu, 2)) is sample_mod._Gemv
    assert type(sample_mod._product(small, None, torch.device("meta"), 2)) is sample_mod._Gemv


def _count_preparations(monkeypatch) -> list:
    """A list that gets an item each time the sampler prepares a model (builds a _Stepper)."""
    built: list = []

    class Counting(sample_mod._Stepper):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(sample_mod, "_Stepper", Counting)
    return built


def test_batch_sizes_share_the_prepared_weights_where_they_take_the_same_products(monkeypatch):
    """Without oneDNN, batch 1 and larger batches take the same kinds of products: one preparation."""
    built = _count_preparations(monkeypatch)
    monkeypatch.setattr(sample_mod, "_packed_weights_ok", lambda: False)
    vocab = char_vocab()
    s = sampler(random_model(len(vocab), seed=4), vocab)
    assert s.generate("ab", 3, 10, seed=1) and s.generate("ab", 1, 10, seed=1) and s.generate("a", 2, 5)
    assert len(built) == 1


def test_greedy_is_the_argmax_of_the_model_step_by_step():
    """A hand-written greedy decoder over model.forward (the prefix re-run each step, O(n^2) but
    obviously right) gives the sampler's greedy text, with <unk> excluded."""
    vocab = char_vocab()
    m = random_model(len(vocab), seed=4)
    with torch.no_grad():
        m.decoder.bias[UNK_ID] += 3.0  # make <unk> tempting
        m.decoder.bias[EOS_ID] -= 5.0
    prime = "abc"
    ctx = [EOS_ID] + vocab.encode(list(prime))
    out = []
    with torch.no_grad():
        for _ in range(30):
            h, _ = m(torch.tensor(ctx + out).unsqueeze(1))
            lp = m.log_probs(h[-1, 0])
            lp[UNK_ID] = -math.inf
            nxt = int(lp.argmax())
            if nxt == EOS_ID:
                break
            out.append(nxt)
    s = sampler(m, vocab).generate(prime, 1, 30, greedy=True)[0]
    assert s.generated == "".join(vocab.decode(out))
    assert s.text == prime + s.generated


# -- knobs -----------------------------------------------------------------------------------------

def test_greedy_equals_top_k_1_and_temperature_0():
    vocab = char_vocab()
    s = sampler(random_model(len(vocab), seed=1), vocab)
    greedy = s.generate("ab", 3, 60, greedy=True, seed=5)
    assert len({x.text for x in greedy}) == 1                     # deterministic within a batch
    for seed in (0, 1, 2):
        assert s.generate("ab", 3, 60, top_k=1, seed=seed) == greedy
        assert s.generate("ab", 3, 60, temperature=0, seed=seed) == greedy
        assert s.generate("ab", 3, 60, temperature=0.7, top_p=1e-9, seed=seed) == greedy


def test_seed_reproduces_and_different_seeds_differ():
    vocab = char_vocab()
    s = sampler(random_model(len(vocab), seed=2), vocab)
    with torch.no_grad():
        s.model.decoder.bias[EOS_ID] = NEVER
    a = s.generate("a", 4, 50, seed=123)
    assert s.generate("a", 4, 50, seed=123) == a
    b = s.generate("a", 4, 50, seed=124)
    assert [x.text for x in a] != [x.text for x in b]
    assert len({x.text for x in a}) == 4                          # the samples of a batch differ too


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_peephole"])
def test_prepared_weights_are_kept_between_calls_and_follow_weight_changes(cell, monkeypatch):
    """generate() prepares the weights once and reuses them while the model is unchanged; an
    optimizer step, load_state_dict or a no_grad in-place update makes it prepare again, and the
    samples are then those of a sampler built afresh on the changed model."""
    built = _count_preparations(monkeypatch)
    vocab = char_vocab()
    model = random_model(len(vocab), cell=cell, seed=4)
    s = sampler(model, vocab)

    def fresh(prime="ab"):
        return sampler(model, vocab).generate(prime, 3, 40, seed=9)

    a = s.generate("ab", 3, 40, seed=9)
    assert s.generate("ab", 3, 40, seed=9) == a and s.generate("b", 2, 10, seed=1) and len(built) == 1
    # batch 1 takes other kinds of products (rnnlm.sample._product): prepared once for it, and
    # again when a larger batch comes back
    assert s.generate("b", 1, 10, seed=1) and s.generate("a", 1, 10, seed=1) and len(built) == 2
    assert s.generate("ab", 3, 40, seed=9) == a and len(built) == 3
    built.clear()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)             # an optimizer step
    model.train()
    model.nll(model(torch.tensor([[2], [3]]), None, 0)[0], torch.tensor([[3], [4]])).backward()
    opt.step()
    model.eval()
    b = s.generate("ab", 3, 40, seed=9)
    assert len(built) == 1 and b != a
    built.clear()
    assert b == fresh() and len(built) == 1
    other = random_model(len(vocab), cell=cell, seed=5)             # load_state_dict copies in place
    model.load_state_dict(other.state_dict())
    built.clear()
    c = s.generate("ab", 3, 40, seed=9)
    assert len(built) == 1 and c != b and c == fresh()
    with torch.no_grad():                                          # a plain in-place write
        model.decoder.bias[5] += 8.0
    d = s.generate("ab", 3, 40, seed=9)
    assert d != c and d == fresh()
    model.decoder.bias.data[6] += 8.0                              # invisible to the version counter ...
    s.refresh()                                                    # ... hence refresh()
    assert s.generate("ab", 3, 40, seed=9) == fresh() != d


def test_model_built_in_inference_mode_is_prepared_on_every_call():
    """Inference tensors have no version counter: nothing is kept, and changes are always seen."""
    vocab = char_vocab()
    with torch.inference_mode():
        model = random_model(len(vocab), seed=4)
    s = sampler(model, vocab)
    a = s.generate("ab", 2, 30, seed=9)
    with torch.inference_mode():
        model.decoder.bias[5] += 8.0
    b = s.generate("ab", 2, 30, seed=9)
    assert b != a and b == sampler(model, vocab).generate("ab", 2, 30, seed=9)


def test_no_seed_leaves_global_rng_alone():
    vocab = char_vocab()
    s = sampler(random_model(len(vocab)), vocab)
    before = torch.get_rng_state()
    s.generate("", 2, 10)
    assert torch.equal(torch.get_rng_state(), before)


# -- <unk> -----------------------------------------------------------------------------------------

UNK_PROBS = [0.4, 0.1, 0.2, 0.15, 0.1, 0.05]  # <unk> most probable; <eos>, a, b, c, d


def categories(samples: list[Sample]) -> np.ndarray:
    """Counts of <eos>, a, b, c, d over one-token samples."""
    c = Counter("<eos>" if x.stop == "eos" else x.generated for x in samples)
    assert set(c) <= {"<eos>", "a", "b", "c", "d"}, c
    return np.array([c["<eos>"], c["a"], c["b"], c["c"], c["d"]])


def test_unk_never_sampled_even_when_most_probable():
    vocab = char_vocab("abcd")
    probs = [0.7, 0.0, 0.15, 0.1, 0.04, 0.01]
    s = sampler(fixed_model(probs), vocab)
    long = s.generate("", 1, 5000, seed=0)[0]
    assert long.stop == "length" and long.tokens == 5000
    assert re.fullmatch("[abcd]{5000}", long.generated)
    batch = s.generate("", 2000, 3, temperature=2.5, seed=1)
    assert all(re.fullmatch("[abcd]{3}", x.generated) for x in batch)
    # top-k / top-p see the distribution without <unk>: the best remaining token is kept
    assert all(x.generated == "aaa" for x in s.generate("", 50, 3, top_k=1, seed=2))
    assert all(x.generated == "aaa" for x in s.generate("", 50, 3, top_p=0.5, seed=3))
    assert s.generate("", 1, 10, greedy=True)[0].generated == "a" * 10


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_unk_removal_is_the_rejection_distribution_chi_square(temperature):
    """Sampling with <unk> removed has the distribution of the course's rejection procedure (draw
    from the full distribution, re-draw while <unk> comes up).

    N = 20,000 one-token samples against (1) the rejection distribution in closed form,
    p_i^(1/T) / sum_{j != unk} p_j^(1/T), with Pearson's goodness-of-fit test, and (2) 20,000
    draws of the rejection procedure itself, with the two-sample (homogeneity) test; 4 degrees
    of freedom each. Seeds are fixed, so the outcome is deterministic; we require p > 0.001
    (critical value 18.47 for 4 d.o.f.). The same statistic rejects a near miss (the <unk> mass
    given to <eos>) with p < 1e-9, so the test has the power to fail.
    """
    N = 20_000
    vocab = char_vocab("abcd")
    s = sampler(fixed_model(UNK_PROBS), vocab)
    got = categories(s.generate("", N, 1, temperature=temperature, seed=11))

    tempered = np.array(UNK_PROBS) ** (1 / temperature)
    expected = tempered[1:] / tempered[1:].sum()           # <eos>, a, b, c, d
    stat, p = chi2_gof(got, expected)
    assert p > 1e-3, (stat, got, expected * N)

    rng = np.random.default_rng(12)
    full = tempered / tempered.sum()
    draws = rng.choice(len(full), size=3 * N, p=full)
    rejection = draws[draws != UNK_ID][:N]                 # re-draw until not <unk>
    assert len(rejection) == N
    ref = np.bincount(rejection, minlength=len(full))[1:]
    stat2, p2 = chi2_homogeneity(got, ref)
    assert p2 > 1e-3, (stat2, got, ref)

    near_miss = full.copy()
    near_miss[EOS_ID] += near_miss[UNK_ID]
    assert chi2_gof(got, near_miss[1:])[1] < 1e-9


def test_a_single_sample_draws_from_the_distribution_chi_square():
    """Batch 1 draws by :func:`_draw_one` from a block of uniforms: one 20,000-token sample of a
    context-free model (<unk> most probable and removed, <eos> never) has the distribution
    p_i / sum_{j != unk} p_j (Pearson, 3 d.o.f., p > 0.001; seeded, so deterministic); a near
    miss (b's mass given to a) is rejected with p < 1e-9."""
    probs = [0.4, 0.0, 0.3, 0.2, 0.1, 0.05]                 # <unk>, <eos>, a, b, c, d
    s = sampler(fixed_model(probs), char_vocab("abcd"))
    text = s.generate("", 1, 20_000, seed=5)[0].generated
    got = np.array([text.count(ch) for ch in "abcd"])
    assert got.sum() == 20_000
    expected = np.array(probs[2:]) / sum(probs[2:])
    stat, p = chi2_gof(got, expected)
    assert p > 1e-3, (stat, got, expected * 20_000)
    near_miss = expected.copy()
    near_miss[0] += near_miss[1] / 2
    near_miss[1] /= 2
    assert chi2_gof(got, near_miss)[1] < 1e-9


def test_draw_one_is_the_inverse_cdf_of_draw():
    """_draw_one(u) is the token whose CDF interval holds u, a token of probability 0 never (also at
    u = 1, past the float64 total: the last token of positive probability); _Uniforms gives the
    numbers per-token float64 draws of the same generator give, across its blocks; so a seeded
    single sample draws what _draw would."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 40, generator=g) * 3
    scores[0, [0, 7, 39]] = float("-inf")
    cdf = torch.softmax(scores[0].double(), 0).cumsum(0)
    for u in torch.linspace(0, 1, 2001)[:-1].tolist() + [float(c) for c in cdf if c < 1]:   # (boundaries too)
        k = int(sample_mod._draw_one(scores, u))
        lo = float(cdf[k - 1]) if k else 0.0
        assert lo <= u < float(cdf[k]) and k not in (0, 7, 39), (u, k)
    assert int(sample_mod._draw_one(scores, 1.0)) == 38
    one = sample_mod._Uniforms(torch.Generator().manual_seed(3), block=7)
    each = torch.Generator().manual_seed(3)
    assert [one() for _ in range(30)] == [float(torch.rand(1, 1, generator=each, dtype=torch.float64))
                                         for _ in range(30)]
    one, each = sample_mod._Uniforms(torch.Generator().manual_seed(4), block=5), torch.Generator().manual_seed(4)
    for _ in range(12):
        row = torch.randn(1, 40, generator=g)
        assert torch.equal(sample_mod._draw_one(row, one()), sample_mod._draw(row, each))


def test_allow_unk_keeps_unk():
    N = 4000
    vocab = char_vocab("abcd")
    s = sampler(fixed_model(UNK_PROBS), vocab)
    samples = s.generate("", N, 1, allow_unk=True, seed=3)
    n_unk = sum(x.generated == UNK for x in samples)
    sd = math.sqrt(N * 0.4 * 0.6)
    assert abs(n_unk - 0.4 * N) < 5 * sd
    assert s.generate("", 1, 5, greedy=True, allow_unk=True)[0].generated == UNK * 5


# -- stopping --------------------------------------------------------------------------------------

def stop_model() -> tuple[RNNLM, Vocab]:
    """After <eos>: a 0.3 / b 0.7. After b: a 0.1 / b 0.9. After a: <eos> with probability 1."""
    vocab = char_vocab("ab")
    A, B = vocab.stoi["a"], vocab.stoi["b"]
    M = np.full((4, 4), NEVER)
    M[EOS_ID, A], M[EOS_ID, B] = math.log(0.3), math.log(0.7)
    M[B, A], M[B, B] = math.log(0.1), math.log(0.9)
    M[A, EOS_ID] = 0.0
    M[UNK_ID, EOS_ID] = 0.0
    return markov_model(M), vocab


def test_samples_in_a_batch_stop_independently():
    model, vocab = stop_model()
    L = 8
    samples = sampler(model, vocab).generate("", 300, L, seed=0)
    eos = [x for x in samples if x.stop == "eos"]
    length = [x for x in samples if x.stop == "length"]
    assert eos and length
    for x in eos:                                  # ends right after its 'a', <eos> not printed
        assert re.fullmatch("b*a", x.generated) and x.tokens == len(x.generated) < L
    for x in length:                               # no 'a' before the last position
        assert re.fullmatch("b{%d}[ab]" % (L - 1), x.generated) and x.tokens == L
    assert len({x.tokens for x in eos}) >= 5       # many different stopping times in one batch
    # P(stop by length) = P(no 'a' in the first L - 1 tokens) = 0.7 * 0.9^(L-2)
    p_len = 0.7 * 0.9 ** (L - 2)
    assert abs(len(length) / 300 - p_len) < 5 * math.sqrt(p_len * (1 - p_len) / 300)


def test_prime_sets_the_context():
    model, vocab = stop_model()
    s = sampler(model, vocab)
    after_a = s.generate("ba", 5, 10, seed=0)      # <eos> is certain after 'a'
    assert all(x.stop == "eos" and x.tokens == 0 and x.text == "ba" for x in after_a)
    after_b = s.generate("b", 1, 1, greedy=True)[0]
    assert after_b.generated == "b" and after_b.stop == "length"


@pytest.mark.parametrize("num_samples,max_length", [(1, 0), (1, 1), (1, 37), (5, 0), (5, 3), (16, 25)])
def test_max_length_is_never_exceeded(num_samples, max_length):
    vocab = char_vocab()
    s = sampler(random_model(len(vocab), seed=6), vocab)
    with torch.no_grad():
        s.model.decoder.bias[EOS_ID] += 2.0       # stop now and then
    for kw in ({}, {"greedy": True}, {"temperature": 1.7, "top_k": 5}, {"top_p": 0.8}):
        for x in s.generate("ab", num_samples, max_length, seed=7, **kw):
            assert x.tokens <= max_length
            assert x.tokens == len(x.generated)     # one char per token, no <unk>
            assert (x.stop == "length") == (x.tokens == max_length)
            assert x.stop in ("eos", "length")


def test_batch_buffer_grows_with_the_samples_not_with_max_length():
    """A batch's token buffer starts small and doubles: samples longer than its first size come out
    whole (greedy batch rows equal the one-sample greedy run), and a huge --max-length with
    samples that end early allocates nothing near max_length x batch (2**31 x 16 int64 = 275 GB)."""
    vocab = char_vocab()
    s = sampler(random_model(len(vocab), seed=11), vocab)
    with torch.no_grad():
        s.model.decoder.bias[EOS_ID] = NEVER
    one = s.generate("ab", 1, 700, greedy=True)[0]
    batch = s.generate("ab", 3, 700, greedy=True)
    assert one.tokens == 700 and all(x == one for x in batch)
    with torch.no_grad():
        s.model.decoder.bias[EOS_ID] = 30.0                     # <eos> after a token or two
    out = s.generate("ab", 16, 2**31 - 1, seed=3)
    assert all(x.stop == "eos" and x.tokens < 50 for x in out)


def test_num_samples_zero_and_bad_arguments():
    vocab = char_vocab()
    s = sampler(random_model(len(vocab)), vocab)
    assert s.generate("", 0, 10) == []
    for kw in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_length": -1},
               {"num_samples": -2}, {"temperature": float("nan")}, {"temperature": float("inf")}):
        with pytest.raises(UsageError):
            s.generate("", **{"num_samples": 1, "max_length": 5, **kw})


# -- prime, streaming, output ----------------------------------------------------------------------

def test_prime_with_unknown_tokens_warns_and_still_samples():
    vocab = char_vocab()
    s = sampler(random_model(len(vocab)), vocab)
    with pytest.warns(UserWarning, match="2 prime token"):
        out = s.generate("abZ!c", 2, 20, seed=0)
    assert all(x.text.startswith("abZ!c") and x.text == "abZ!c" + x.generated for x in out)
    assert all(x.tokens > 0 or x.stop == "eos" for x in out)
    assert s.encode_prime("abZ!c") == ([EOS_ID] + vocab.encode(["a", "b"]) + [UNK_ID, UNK_ID]
                                       + vocab.encode(["c"]), 2)


@pytest.mark.parametrize("eos,prime,tokens", [
    ("line", "ab", ["a", "b"]),
    ("line", "ab\n", ["a", "b", EOS]),
    ("line", "ab\ncd", ["a", "b", EOS, "c", "d"]),
    ("paragraph", "ab\n", ["a", "b", "\n"]),
    ("paragraph", "ab\ncd", ["a", "b", "\n", "c", "d"]),
    ("paragraph", "ab\n\n", ["a", "b", EOS]),
    ("none", "ab\n", ["a", "b", "\n"]),
])
def test_prime_is_continued_not_ended(eos, prime, tokens):
    vocab = char_vocab("abcd\n")
    s = Sampler(random_model(len(vocab)), vocab, Tokenizer(level="char", eos=eos))
    assert s.encode_prime(prime) == ([EOS_ID] + vocab.encode(tokens), 0)


def test_word_level_prime_streaming_and_join():
    words = ["the", "cat", "sat", "on", "mat", "a"]
    vocab = Vocab([UNK, EOS, *words])
    s = Sampler(random_model(len(vocab), seed=8), vocab, Tokenizer(level="word", eos="line"))
    with torch.no_grad():
        s.model.decoder.bias[EOS_ID] = NEVER
    assert s.encode_prime("the cat") == ([EOS_ID, vocab.stoi["the"], vocab.stoi["cat"]], 0)
    pieces: list[str] = []
    x = s.generate("the cat", 1, 6, seed=1, on_text=pieces.append)[0]
    assert len(pieces) == 6 and "".join(pieces) == " " + x.generated
    assert x.text == "the cat " + x.generated and len(x.generated.split()) == 6
    assert set(x.generated.split()) <= set(words)


def test_char_streaming_pieces_add_up():
    vocab = char_vocab()
    s = sampler(random_model(len(vocab), seed=9), vocab)
    pieces: list[str] = []
    x = s.generate("ab", 1, 40, seed=4, on_text=pieces.append)[0]
    assert "".join(pieces) == x.generated and len(pieces) == x.tokens


def test_sample_json():
    vocab = char_vocab()
    x = sampler(random_model(len(vocab)), vocab).generate("a", 1, 5, seed=0)[0]
    d = x.to_json()
    assert {"text", "tokens", "stop"} <= set(d) and d["stop"] in ("eos", "length")
    assert d["text"] == x.text and d["tokens"] == x.tokens


def test_bidirectional_model_samples_with_forward_direction():
    vocab = char_vocab()
    m = random_model(len(vocab), bidirectional=True, seed=10)
    s = sampler(m, vocab)
    a = s.generate("ab", 2, 20, seed=0)
    # Breaking the backward stack changes nothing.
    with torch.no_grad():
        for p in m.rnns[1].parameters():
            p.add_(1.0)
    assert s.generate("ab", 2, 20, seed=0) == a


def test_sampler_leaves_the_model_mode_and_checks_its_arguments():
    vocab = char_vocab()
    model = random_model(len(vocab), seed=3).train()
    s = sampler(model, vocab)
    assert model.training                                        # building a Sampler changes nothing
    s.generate("ab", 2, 5, seed=1)
    assert model.training                                        # generate() restores the mode
    for kw in ({"top_k": 2.5}, {"num_samples": 2.5}, {"max_length": None}, {"temperature": "0.8"},
               {"seed": 2 ** 70}, {"seed": "abc"}, {"top_p": None}):
        with pytest.raises(UsageError):
            s.generate("ab", **{"num_samples": 1, "max_length": 5, **kw})
    with pytest.raises(UsageError):
        Sampler(model, vocab, Tokenizer(level="char", eos="line"), device="gpu")


def test_a_batch_larger_than_the_machine_is_refused_before_it_is_drawn(monkeypatch):
    """--num-samples far beyond memory: a usage error up front (on Linux the allocation would not fail
    but summon the kernel's out-of-memory killer, with no message); a batch that fits is drawn."""
    import rnnlm.sample as sm
    s = sampler(random_model(len(char_vocab())))
    monkeypatch.setattr(sm, "_memory_size", lambda device: 64 * 2**20)   # a 64 MiB machine
    with pytest.raises(UsageError, match=r"--num-samples 1,000,000 is one batch, which needs about .* GiB"):
        s.generate("a", num_samples=1_000_000, max_length=3, seed=0)
    assert len(s.generate("a", num_samples=50, max_length=3, seed=0)) == 50
    monkeypatch.setattr(sm, "_memory_size", lambda device: None)         # not known: no check
    assert len(s.generate("a", num_samples=2, max_length=3, seed=0)) == 2
