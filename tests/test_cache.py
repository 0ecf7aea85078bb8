"""The continuous cache (rnnlm.cache): the definition, known answers, and its place in evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rnnlm.cache as cache_mod
from rnnlm.cache import CacheSpec, cache_distribution, cache_nll, parse_sizes, parse_values
from rnnlm.config import ModelConfig
from rnnlm.errors import UsageError
from rnnlm.evaluate import evaluate_ids, perplexity, stream_nll, text_ids
from rnnlm.models import RNNLM
from rnnlm.text import EOS, EOS_ID, UNK, Tokenizer, Vocab


def _random_case(n: int, V: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, D, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    probs = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 2, 1)
    nll = -probs[torch.arange(n), targets].log()
    return features, targets, probs, nll


def _by_definition(features, targets, probs, size, theta, lam) -> float:
    """Σ_t -log p(y_t), each p the whole mixture distribution written out (inf where one is 0)."""
    ps = [float(cache_distribution(features, targets.tolist(), probs, t, size, theta, lam)[targets[t]])
          for t in range(len(targets))]
    return math.inf if min(ps) == 0 else -sum(math.log(p) for p in ps)


# -- the definition --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,size", [(40, 7), (40, 100), (700, 300), (900, 256)])
def test_cache_nll_is_the_definition(n, size):
    # Block boundaries (256-position query blocks) and windows longer than the text are covered.
    features, targets, probs, nll = _random_case(n, V=11, D=6, seed=n + size)
    spec = CacheSpec(size, (0.0, 0.7, 3.0), (0.0, 0.25, 1.0))
    got = cache_nll(features, targets, nll, spec)
    assert got.shape == (3, 3) and got.dtype == torch.float64
    for a, theta in enumerate(spec.thetas):
        for b, lam in enumerate(spec.lambdas):
            want = _by_definition(features, targets, probs, size, theta, lam)
            if math.isinf(want):
                assert math.isinf(float(got[a, b]))
            else:
                assert float(got[a, b]) == pytest.approx(want, rel=1e-12), (theta, lam)


def test_the_mixture_is_a_distribution_and_theta_zero_counts():
    features, targets, probs, _ = _random_case(30, V=5, D=4, seed=3)
    for t in (0, 1, 9, 29):
        for theta, lam in ((0.0, 0.3), (2.0, 0.5), (1.0, 1.0)):
            p = cache_distribution(features, targets.tolist(), probs, t, 8, theta, lam)
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
            assert bool((p >= 0).all())
    # θ = 0: the cache is the frequency of each token among the next tokens of the last `size` positions.
    t, size = 20, 8
    window = targets[t - size:t].tolist()
    p = cache_distribution(features, targets.tolist(), probs, t, size, 0.0, 1.0)
    assert p.tolist() == pytest.approx([window.count(w) / size for w in range(5)], abs=1e-15)
    # An empty cache (the first position) leaves the model's distribution.
    assert torch.equal(cache_distribution(features, targets.tolist(), probs, 0, size, 1.0, 0.5), probs[0])


def test_lambda_zero_is_exactly_the_model_and_extreme_values_stay_exact():
    features, targets, probs, nll = _random_case(300, V=7, D=5, seed=4)
    out = cache_nll(features, targets, nll, CacheSpec(50, (1.0,), (0.0,)))
    assert float(out[0, 0]) == float(nll.sum())
    # A target the model gives 1e-300 (nll 690.8): the log-space mixture does not underflow.
    nll2 = nll.clone()
    nll2[100] = 300 * math.log(10)
    out2 = cache_nll(features, targets, nll2, CacheSpec(50, (0.0,), (0.0, 0.5)))
    assert float(out2[0, 0]) == pytest.approx(float(nll2.sum()), rel=1e-15)
    window = targets[50:100].tolist()
    hits = window.count(int(targets[100]))
    assert hits > 0                          # (this seed's case) the cache rescues it
    if hits:
        rest = float(out2[0, 1]) - float(cache_nll(features, targets, nll, CacheSpec(50, (0.0,), (0.5,)))[0, 0])
        assert rest == pytest.approx(-math.log(0.5 * 1e-300 + 0.5 * hits / 50)
                                     + math.log(0.5 * math.exp(-float(nll[100])) + 0.5 * hits / 50), rel=1e-9)


def test_a_repeated_text_is_what_the_cache_is_for():
    # Features that identify the context exactly, and a model that knows nothing: the cache learns
    # the text's repetitions as it goes.
    V, period = 20, 13
    targets = torch.tensor([(7 * i) % V for i in range(period)] * 20)
    features = torch.nn.functional.one_hot(torch.arange(len(targets)) % period, period).float() * 4
    nll = torch.full((len(targets),), math.log(V), dtype=torch.float64)
    out = cache_nll(features, targets, nll, CacheSpec(100, (1.0, 10.0), (0.5,)))
    n = len(targets)
    assert float(out[0, 0]) / n < math.log(V) - 1.0
    assert float(out[1, 0]) < float(out[0, 0])            # sharper attention, the same context found


def test_spec_and_value_parsing():
    assert parse_values("0.1, 0.2,1", "--x") == (0.1, 0.2, 1.0)
    assert parse_sizes("100, 2e3", "--n") == (100, 2000)
    for bad in ("0", "1.5", "inf", "-3"):
        with pytest.raises(UsageError, match="--n"):
            parse_sizes(bad, "--n")
    for bad in ("", "a", "0.1,,0.2", "1,1"):
        with pytest.raises(UsageError, match="--x"):
            parse_values(bad, "--x")
    for kw in (dict(size=0), dict(size=2.5), dict(size=True), dict(size=3, thetas=(-1.0,)),
               dict(size=3, thetas=(float("nan"),)), dict(size=3, lambdas=(1.5,)),
               dict(size=3, lambdas=(float("nan"),)), dict(size=3, lambdas=()), dict(size=3, thetas=(True,)),
               dict(size=3, thetas=("1",)), dict(size=3, lambdas=("0.1",))):
        with pytest.raises(UsageError):
            CacheSpec(**kw)
    assert CacheSpec(5, (1.0, 2.0), (0.1, 0.2)).grid() == [(1.0, 0.1), (1.0, 0.2), (2.0, 0.1), (2.0, 0.2)]


# -- in evaluation ---------------------------------------------------------------------------------

CHARS = "abcdefgh \n"


def _setup(seed: int = 1, **kw):
    vocab, tok = Vocab([UNK, EOS, *CHARS]), Tokenizer(level="char", eos="line")
    torch.manual_seed(seed)
    args = dict(cell="lstm", hidden_size=16, embedding_size=8, num_layers=1)
    args.update(kw)
    return vocab, tok, RNNLM(len(vocab), ModelConfig(**args)).eval()


def _text(n_lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join("".join(rng.choice(list("abcdefgh "), rng.integers(1, 12))) + "\n" for _ in range(n_lines))


def test_collected_features_are_the_model_s_own_at_every_batch_size():
    vocab, tok, model = _setup()
    ids = text_ids(_text(80, 2), tok, vocab)
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([[EOS_ID], ids[:-1]])).unsqueeze(1)
        h, _ = model(x)
        want_h = h[:, 0]
        want_nll = model.nll(want_h, torch.from_numpy(ids.astype(np.int64)), reduction="none").double()
    for B in (1, 3, 8):
        collect: dict = {}
        total = stream_nll(model, ids, batch_size=B, collect=collect)
        assert collect["features"].shape == (len(ids), model.out_dim)
        assert np.allclose(collect["features"], want_h.numpy(), atol=1e-5)
        assert torch.allclose(collect["nll"], want_nll, atol=1e-5)
        assert float(collect["nll"].sum()) == pytest.approx(total, rel=1e-12)


def test_cache_perplexity_does_not_depend_on_batch_size_and_lambda_zero_is_the_plain_number(tmp_path):
    vocab, tok, model = _setup(seed=3, hidden_size=24)
    path = tmp_path / "eval.txt"
    path.write_text(_text(150, 5) * 2)                      # a repeated half, for the cache to find
    spec = CacheSpec(400, (0.5, 2.0), (0.0, 0.3))
    results = [perplexity(model, vocab, tok, path, batch_size=B, cache=spec) for B in (1, 4, 9)]
    for res in results:
        assert [(e["theta"], e["lambda"]) for e in res["cache"]] == spec.grid()
        for e in res["cache"]:
            assert e["size"] == 400 and e["ppl"] == math.exp(e["loss"]) and e["bpc"] == e["bits_per_token"]
            if e["lambda"] == 0.0:
                assert e["loss"] == pytest.approx(res["loss"], rel=1e-12)
        assert min(e["loss"] for e in res["cache"]) < res["loss"]   # the repetition is found
    for res in results[1:]:
        for e, e1 in zip(res["cache"], results[0]["cache"]):
            assert e["loss"] == pytest.approx(e1["loss"], rel=1e-6)
    plain = perplexity(model, vocab, tok, path, batch_size=4)
    assert "cache" not in plain and plain["loss"] == results[1]["loss"]


def test_bidirectional_models_get_a_cache_per_direction():
    vocab, tok, model = _setup(seed=4, bidirectional=True)
    ids = text_ids(_text(60, 6), tok, vocab)
    spec = CacheSpec(50, (1.0,), (0.2,))
    out = evaluate_ids(model, ids, batch_size=2, cache=spec)
    e = out["cache"][0]
    n = len(ids)
    for d, stream in ((0, ids), (1, ids[::-1].copy())):
        collect: dict = {}
        stream_nll(model, stream, direction=d, collect=collect)
        want = float(cache_nll(collect["features"], torch.from_numpy(stream.astype(np.int64)), collect["nll"],
                               spec)[0, 0]) / n
        assert e["forward_loss" if d == 0 else "backward_loss"] == pytest.approx(want, rel=1e-6)
    assert e["loss"] == pytest.approx((e["forward_loss"] + e["backward_loss"]) / 2, rel=1e-15)


def test_long_texts_keep_their_features_in_a_temporary_file(monkeypatch):
    vocab, tok, model = _setup(seed=5)
    ids = text_ids(_text(60, 7), tok, vocab)
    spec = CacheSpec(100, (1.0,), (0.3,))
    in_memory = evaluate_ids(model, ids, batch_size=3, cache=spec)["cache"][0]["loss"]
    monkeypatch.setattr(cache_mod, "FEATURES_IN_MEMORY_MAX", 1024)
    collect: dict = {}
    stream_nll(model, ids, batch_size=3, collect=collect)
    assert isinstance(collect["features"], np.memmap)
    tmpdir = collect["_tmpdir"].name
    assert evaluate_ids(model, ids, batch_size=3, cache=spec)["cache"][0]["loss"] == pytest.approx(in_memory,
                                                                                                   rel=1e-12)
    del collect
    import gc
    gc.collect()
    import os
    assert not os.path.exists(tmpdir)


def test_a_bad_cache_argument_is_a_usage_error(tmp_path):
    vocab, tok, model = _setup()
    path = tmp_path / "eval.txt"
    path.write_text("abc\n")
    with pytest.raises(UsageError, match="CacheSpec"):
        perplexity(model, vocab, tok, path, cache=500)


def test_pieces_repaired_by_the_exactness_check_record_the_repaired_features():
    # A model that remembers far beyond the warm-up (test_evaluate's long-memory case): the
    # batched pieces are re-run from the exact state, and what is collected is the re-run's.
    torch.manual_seed(2)
    model = RNNLM(12, ModelConfig(hidden_size=32, embedding_size=16, num_layers=1, init_range=0.8,
                                  forget_bias=10.0)).eval()
    ids = np.random.default_rng(2).integers(0, 12, 3000)
    ref: dict = {}
    stream_nll(model, ids, batch_size=1, collect=ref)
    info: dict = {}
    got: dict = {}
    stream_nll(model, ids, batch_size=4, info=info, collect=got)
    assert info["rerun_tokens"] > 0
    assert np.allclose(got["features"], ref["features"], atol=1e-4)
    assert torch.allclose(got["nll"], ref["nll"], atol=1e-4)
    warm: dict = {}
    stream_nll(model, ids, batch_size=4, exact=False, collect=warm)
    assert not np.allclose(warm["features"], ref["features"], atol=1e-2)   # the check had something to repair


@pytest.mark.parametrize("theta", [700.0, 744.0, 1000.0])
def test_a_hit_far_below_the_best_position_is_still_counted_exactly(theta):
    # Three positions, one feature each; at t = 2 the only position whose next token was the
    # target (i = 0) scores θ nats below the other, and the model gives the target e^-2000:
    # p = 0.5 e^-2000 + 0.5 e^-θ / (1 + e^-θ), whose log is log 0.5 - θ to 1e-300. (At 708-745
    # nats the weight is a subnormal float64, at 1000 it is 0.)
    features = torch.tensor([[0.0], [1.0], [1.0]])
    targets = torch.tensor([3, 4, 3])
    nll = torch.tensor([1.5, 2.5, 2000.0], dtype=torch.float64)
    got = float(cache_nll(features, targets, nll, CacheSpec(10, (theta,), (0.5,)))[0, 0])
    want = 1.5 + (2.5 - math.log(0.5)) + (theta - math.log(0.5))
    assert got == pytest.approx(want, rel=1e-15)


def test_a_cache_longer_than_the_text_holds_all_of_it():
    features, targets, probs, nll = _random_case(50, V=5, D=3, seed=8)
    want = cache_nll(features, targets, nll, CacheSpec(50, (1.0,), (0.4,)))
    assert torch.equal(cache_nll(features, targets, nll, CacheSpec(10 ** 30, (1.0,), (0.4,))), want)


def test_several_cache_sizes_from_one_pass_equal_separate_evaluations(tmp_path):
    vocab, tok, model = _setup(seed=9)
    path = tmp_path / "eval.txt"
    path.write_text(_text(100, 9) * 2)
    specs = [CacheSpec(30, (0.5, 2.0), (0.2,)), CacheSpec(300, (1.0,), (0.1, 0.3))]
    both = perplexity(model, vocab, tok, path, batch_size=3, cache=specs)["cache"]
    apart = [e for spec in specs for e in perplexity(model, vocab, tok, path, batch_size=3, cache=spec)["cache"]]
    assert [(e["size"], e["theta"], e["lambda"]) for e in both] == [(30, 0.5, 0.2), (30, 2.0, 0.2),
                                                                      (300, 1.0, 0.1), (300, 1.0, 0.3)]
    assert [e["loss"] for e in both] == [e["loss"] for e in apart]
    for bad in ([], [specs[0], 30], (30,)):
        with pytest.raises(UsageError, match="CacheSpec"):
            perplexity(model, vocab, tok, path, cache=bad)
