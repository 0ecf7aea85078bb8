"""Perplexity and scoring: the definition computed by hand, invariances, and known answers."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnlm.config import ModelConfig, build_config
from rnnlm.errors import UsageError
from rnnlm.evaluate import evaluate_ids, perplexity, score_sentences, stream_nll, text_ids
from rnnlm.models import RNNLM
from rnnlm.text import EOS, EOS_ID, UNK, Tokenizer, Vocab

CHARS = "abcdefgh \n"


def char_setup(eos: str = "line") -> tuple[Vocab, Tokenizer]:
    return Vocab([UNK, EOS, *CHARS]), Tokenizer(level="char", eos=eos)


def random_model(V: int, seed: int = 0, **kw) -> RNNLM:
    torch.manual_seed(seed)
    args = dict(cell="lstm", hidden_size=16, embedding_size=8, num_layers=1)
    args.update(kw)
    return RNNLM(V, ModelConfig(**args)).eval()


def random_text(n_lines: int, seed: int = 0, alphabet: str = "abcdefgh ") -> str:
    rng = random.Random(seed)
    return "".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) + "\n" for _ in range(n_lines))


def hand_nll(model, ids, direction: int = 0) -> float:
    """The definition, one token at a time: start state zero, previous token <eos>, state carried."""
    total, state, prev = 0.0, None, EOS_ID
    with torch.no_grad():
        for t in ids:
            h, state = model(torch.tensor([[prev]]), state, direction)
            total -= float(model.log_probs(h[-1])[0, int(t)])
            prev = int(t)
    return total


# -- the definition --------------------------------------------------------------------------------

def test_perplexity_is_the_definition_computed_by_hand(tmp_path):
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=1)
    text = "abc de\nfgh\n\nhead bag\n"
    path = tmp_path / "eval.txt"
    path.write_text(text)
    ids = text_ids(text, tok, vocab)
    assert list(ids) == vocab.encode(tok.tokenize(text))       # every token incl. each <eos>
    assert int((ids == EOS_ID).sum()) == 4
    want = hand_nll(model, ids)
    for batch_size in (1, 2, 3, 8):
        res = perplexity(model, vocab, tok, path, batch_size=batch_size)
        assert res["tokens"] == len(ids)
        assert res["nll"] == pytest.approx(want, rel=1e-5)
        assert res["loss"] == pytest.approx(want / len(ids), rel=1e-5)


def test_ppl_and_bits_are_exactly_functions_of_the_loss(tmp_path):
    vocab, tok = char_setup()
    path = tmp_path / "eval.txt"
    path.write_text(random_text(30))
    res = perplexity(random_model(len(vocab), seed=2), vocab, tok, path)
    assert res["ppl"] == math.exp(res["loss"])
    assert res["bits_per_token"] == res["loss"] / math.log(2)
    assert res["bpc"] == res["bits_per_token"]
    assert res["loss"] == res["nll"] / res["tokens"]
    ids = text_ids(path.read_text(), tok, vocab)
    out = evaluate_ids(random_model(len(vocab), seed=2), ids)
    assert out["ppl"] == math.exp(out["loss"]) and out["bits_per_token"] == out["loss"] / math.log(2)


def test_oov_words_and_word_level_perplexity(tmp_path):
    vocab, tok = char_setup()
    path = tmp_path / "eval.txt"
    path.write_text("ab xyz\nc  dd\n")                          # x, y, z are not in the vocabulary
    res = perplexity(random_model(len(vocab)), vocab, tok, path)
    assert res["tokens"] == 13 and res["oov"] == 3 and res["oov_rate"] == 3 / 13
    assert res["words"] == 4 + 2                                 # ab, xyz, c, dd + two <eos>
    assert res["word_ppl"] == pytest.approx(math.exp(res["nll"] / 6), rel=1e-12)


def test_missing_or_empty_file_is_a_usage_error(tmp_path):
    vocab, tok = char_setup()
    model = random_model(len(vocab))
    with pytest.raises(UsageError):
        perplexity(model, vocab, tok, tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError):
        perplexity(model, vocab, tok, tmp_path / "empty.txt")


# -- batch size does not change the number ---------------------------------------------------------

def long_memory_model(V: int, seed: int = 2, init_range: float = 0.8, forget_bias: float = 10.0) -> RNNLM:
    """A random LSTM whose forget gates sit near 1 (bias 8-10) and whose weights are large: its
    cell state sums the whole history, so the state carries information over thousands of
    tokens -- far beyond the 256-token warm-up of the batched pieces."""
    torch.manual_seed(seed)
    return RNNLM(V, ModelConfig(hidden_size=32, embedding_size=16, num_layers=1, init_range=init_range,
                                forget_bias=forget_bias)).eval()


@pytest.mark.parametrize("seed,init_range,forget_bias", [(2, 0.8, 10.0), (0, 0.5, 8.0)])
def test_batch_size_does_not_change_perplexity_even_with_long_memory(seed, init_range, forget_bias):
    V = 12
    model = long_memory_model(V, seed, init_range, forget_bias)
    ids = np.random.default_rng(seed).integers(0, V, 3000)
    ref = stream_nll(model, ids, batch_size=1)
    warm_up_only = []
    for B in (2, 4, 7):
        info: dict = {}
        got = stream_nll(model, ids, batch_size=B, info=info)
        assert abs(got - ref) / ref < 0.005                      # the contract
        assert got == pytest.approx(ref, rel=1e-6)               # in fact the same number
        assert info["pieces"] == B and info["rerun_tokens"] > 0  # the check had to repair pieces
        warm_up_only.append(abs(stream_nll(model, ids, batch_size=B, exact=False) - ref) / ref)
    # The test means something: warming each piece up without the check is off by more than 0.2 %
    # (by up to 6 % for the first model: more than the contract's 0.5 %).
    assert max(warm_up_only) > 0.002, warm_up_only


def test_state_comparison_of_the_exactness_check():
    from rnnlm.evaluate import _close
    h = torch.rand(2, 1, 4)
    c = torch.tensor([[[60.0, -45.0, 0.3, 3.0]], [[1.0, 2.0, -3.0, 25.0]]])
    assert _close((h, c), (h.clone(), c.clone()), 1e-4)
    assert _close((h, c), (h + 1e-6, c * (1 + 1e-6)), 1e-4)                 # float rounding
    deep = c.clone()
    deep[0, 0, 0], deep[1, 0, 3] = 90.0, 2000.0                              # integrators far in saturation
    assert _close((h, c), (h, deep), 1e-4)
    for i, v in [((0, 0, 1), 45.0), ((0, 0, 3), 3.5), ((0, 0, 3), 12.0), ((1, 0, 3), 19.0)]:
        other = c.clone()
        other[i] = v                                                         # flipped, or not deep enough
        assert not _close((h, c), (h, other), 1e-4), (i, v)
    assert not _close((h, c), (h + 1e-2, c), 1e-4)
    assert _close(h, h + 1e-6, 1e-4) and not _close(h, h + 1e-2, 1e-4)      # GRU / RNN states


@pytest.fixture()
def _tf32_flags():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_exactness_tolerance_follows_the_arithmetic(_tf32_flags):
    from rnnlm.evaluate import TOL_16BIT, TOL_FP32, TOL_TF32, _close, state_tolerance
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # PyTorch's defaults
    assert state_tolerance("cpu", None) == TOL_FP32 == 1e-4                 # TF32 is a GPU's
    assert state_tolerance(torch.device("cuda"), None) == TOL_TF32          # cuDNN's RNNs in TF32
    assert state_tolerance("cuda:1", torch.bfloat16) == state_tolerance("cpu", torch.float16) == TOL_16BIT
    torch.backends.cudnn.allow_tf32 = False
    assert state_tolerance("cuda", None) == TOL_FP32                        # true fp32 asked for
    torch.backends.cuda.matmul.allow_tf32 = True
    assert state_tolerance("cuda", None) == TOL_TF32
    # The scale: two batchings of a TF32 computation differ by a few units of its rounding
    # (2^-11); they must count as the same state, a real difference must not.
    h = torch.rand(2, 1, 64) * 2 - 1
    c = torch.randn(2, 1, 64) * 3
    noise = 4 * 2.0 ** -11
    rounded = (h * (1 + noise), c * (1 - noise))
    assert not _close((h, c), rounded, TOL_FP32)
    assert _close((h, c), rounded, TOL_TF32)
    assert not _close((h, c), (h + 0.05, c), TOL_TF32)
    assert TOL_FP32 < TOL_TF32 < TOL_16BIT


def test_batching_a_short_memory_model_needs_no_rerun(tmp_path):
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=3, num_layers=2)
    ids = text_ids(random_text(300, seed=3), tok, vocab)
    ref = stream_nll(model, ids)
    for B in (3, 16):
        info: dict = {}
        assert stream_nll(model, ids, batch_size=B, info=info) == pytest.approx(ref, rel=1e-6)
        assert info["rerun_tokens"] == 0


def test_window_length_does_not_matter():
    V = 12
    model = long_memory_model(V)
    ids = np.random.default_rng(5).integers(0, V, 150)
    ref = hand_nll(model, ids)
    for window in (1, 7, 64, 1000):
        for B in (1, 3):
            got = stream_nll(model, ids, batch_size=B, window=window, burn_in=16)
            assert got == pytest.approx(ref, rel=1e-5), (window, B)


def test_evaluation_restores_training_mode_and_reports_progress():
    vocab, tok = char_setup()
    model = random_model(len(vocab), dropout=0.5).train()
    ids = text_ids(random_text(50), tok, vocab)
    seen: list[int] = []
    res = evaluate_ids(model, ids, batch_size=3, progress=seen.append)
    assert model.training
    assert sum(seen) == len(ids)
    model.eval()
    assert res["loss"] == pytest.approx(stream_nll(model, ids) / len(ids), rel=1e-6)  # dropout was off


def test_progress_bar_option(tmp_path, capsys):
    vocab, tok = char_setup()
    path = tmp_path / "eval.txt"
    path.write_text(random_text(40))
    model = random_model(len(vocab))
    seen: list[int] = []
    quiet = perplexity(model, vocab, tok, path)
    assert capsys.readouterr().err == ""
    assert perplexity(model, vocab, tok, path, progress=seen.append)["loss"] == quiet["loss"]
    assert sum(seen) == quiet["tokens"]
    assert perplexity(model, vocab, tok, path, progress=True)["loss"] == quiet["loss"]
    assert "evaluating" in capsys.readouterr().err
    perplexity(model, vocab, tok, path, progress="auto")  # small file (and no terminal): quiet
    assert capsys.readouterr().err == ""


# -- bidirectional ---------------------------------------------------------------------------------

def test_bidirectional_reports_both_directions_and_their_geometric_mean(tmp_path):
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=4, bidirectional=True)
    text = random_text(12, seed=4)
    path = tmp_path / "eval.txt"
    path.write_text(text)
    ids = text_ids(text, tok, vocab)
    n = len(ids)
    res = perplexity(model, vocab, tok, path)
    assert res["forward_loss"] == pytest.approx(hand_nll(model, ids, 0) / n, rel=1e-5)
    # the backward stack reads the reversed stream, starting from <eos>
    assert res["backward_loss"] == pytest.approx(hand_nll(model, ids[::-1], 1) / n, rel=1e-5)
    assert res["forward_loss"] != pytest.approx(res["backward_loss"], rel=1e-3)
    assert res["ppl"] == pytest.approx(math.sqrt(res["forward_ppl"] * res["backward_ppl"]), rel=1e-12)
    assert res["loss"] == pytest.approx((res["forward_loss"] + res["backward_loss"]) / 2, rel=1e-12)
    assert res["forward_ppl"] == math.exp(res["forward_loss"])
    assert perplexity(model, vocab, tok, path, batch_size=5)["ppl"] == pytest.approx(res["ppl"], rel=1e-6)
    seen: list[int] = []
    perplexity(model, vocab, tok, path, progress=seen.append)
    assert sum(seen) == 2 * n


# -- scoring ---------------------------------------------------------------------------------------

SENTENCES = ["abc", "hello there", "a", "dead beef cafe", "", "ggg hhh", "fade"]


def test_score_is_the_sum_of_per_token_log_probs():
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=5, num_layers=2)
    res = score_sentences(model, vocab, tok, SENTENCES)
    for s, r in zip(SENTENCES, res):
        ids = vocab.encode(list(s)) + [EOS_ID]                   # EOS appended
        assert r["text"] == s and r["tokens"] == len(ids)
        assert r["logprob"] == pytest.approx(-hand_nll(model, ids), rel=1e-5, abs=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(-r["logprob"] / r["tokens"]), rel=1e-12)
    assert res[1]["oov"] == 5 == sum(c not in vocab for c in "hello there")  # l, l, o, t, r


def test_score_does_not_depend_on_the_other_sentences_in_the_batch():
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=6, cell="gru")
    alone = [score_sentences(model, vocab, tok, [s])[0]["logprob"] for s in SENTENCES]
    for batch_size in (1, 2, 3, 64):
        together = [r["logprob"] for r in score_sentences(model, vocab, tok, SENTENCES, batch_size=batch_size)]
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    longer = score_sentences(model, vocab, tok, SENTENCES + ["h" * 200, "abc"])
    np.testing.assert_allclose([r["logprob"] for r in longer[: len(SENTENCES)]], alone, rtol=1e-5, atol=1e-5)
    assert longer[-1]["logprob"] == pytest.approx(alone[0], rel=1e-5)


def test_score_long_sentences_go_through_in_chunks(monkeypatch):
    """With a tiny logit budget every sentence is scored in many time chunks (state carried); the
    scores equal the one-piece computation and the hand-computed sum."""
    import rnnlm.evaluate as ev
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=7, num_layers=2)
    sents = SENTENCES + ["abcdefgh" * 40]
    whole = [r["logprob"] for r in score_sentences(model, vocab, tok, sents)]
    monkeypatch.setattr(ev, "_SCORE_LOGITS", 3 * len(vocab))      # 3 time steps per chunk at batch 1
    for bs in (1, 3):
        chunked = [r["logprob"] for r in score_sentences(model, vocab, tok, sents, batch_size=bs)]
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    ids = vocab.encode(list(sents[-1])) + [EOS_ID]
    assert whole[-1] == pytest.approx(-hand_nll(model, ids), rel=1e-5)


def test_score_word_level_and_n_best_rescoring():
    """Two candidate transcriptions: the one the model finds likelier wins (n-best rescoring)."""
    words = ["the", "cat", "sat", "on", "mat", "a", "hat"]
    vocab = Vocab([UNK, EOS, *words])
    tok = Tokenizer(level="word", eos="line")
    model = random_model(len(vocab), seed=7)
    M = torch.full((len(vocab), len(vocab)), -4.0)               # a bigram model: the cat sat on the mat
    for a, b in [("<eos>", "the"), ("the", "cat"), ("cat", "sat"), ("sat", "on"), ("on", "the"),
                 ("the", "mat"), ("mat", "<eos>")]:
        M[vocab.stoi[a], vocab.stoi[b]] = 4.0
    bigram = RNNLM(len(vocab), ModelConfig(cell="rnn_relu", hidden_size=len(vocab), embedding_size=len(vocab),
                                           num_layers=1))
    with torch.no_grad():
        bigram.embedding.weight.copy_(torch.eye(len(vocab)))
        bigram.rnns[0].weight_ih_l0.copy_(torch.eye(len(vocab)))
        bigram.rnns[0].weight_hh_l0.zero_()
        bigram.rnns[0].bias_ih_l0.zero_()
        bigram.rnns[0].bias_hh_l0.zero_()
        bigram.decoder.weight.copy_(M.t())
        bigram.decoder.bias.zero_()
    candidates = ["the cat sat on the mat", "the cat sat on a hat"]
    res = score_sentences(bigram.eval(), vocab, tok, candidates)
    assert res[0]["tokens"] == 7 and res[0]["logprob"] > res[1]["logprob"]
    best = max(res, key=lambda r: r["logprob"])
    assert best["text"] == candidates[0]
    # and with any model, the score is the per-token sum
    r = score_sentences(model, vocab, tok, ["the cat"])[0]
    ids = [vocab.stoi["the"], vocab.stoi["cat"], EOS_ID]
    assert r["logprob"] == pytest.approx(-hand_nll(model, ids), rel=1e-5)


# -- known answers through the trainer -------------------------------------------------------------

def _train(tmp_path: Path, name: str, text: str, *overrides: str):
    from rnnlm.train import Trainer
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    cfg = build_config(None, [f"data.path={path}", "data.level=char", "data.split=[1.0, 0.0, 0.0]",
                              "model.hidden_size=32", "model.embedding_size=16", "model.num_layers=1",
                              "train.optimizer=adam", "train.lr=0.01", "train.lr_schedule=cosine",
                              "train.batch_size=16", "train.bptt=32", "train.epochs=100",
                              "train.eval_every=null", "train.log_every=1000", "train.device=cpu", *overrides])
    trainer = Trainer(cfg, run_dir=tmp_path / f"run-{name}", progress=False)
    trainer.fit()
    return trainer


def test_trained_on_a_deterministic_text_perplexity_is_near_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    tr = _train(tmp_path, "abc", "abcabcabc\n" * 1000, "data.eos=line", "train.max_steps=150")
    (tmp_path / "eval.txt").write_text("abcabcabc\n" * 100)
    res = perplexity(tr.model, tr.vocab, tr.tokenizer, tmp_path / "eval.txt")
    assert res["tokens"] == 1000 and res["oov"] == 0
    assert res["ppl"] < 1.1, res


def test_trained_on_iid_text_perplexity_is_the_entropy(tmp_path, monkeypatch):
    """Text drawn i.i.d. from p: no model can beat exp(H(p)); a trained one gets within a few percent."""
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    p = np.array([0.5, 0.25, 0.15, 0.1])
    chars = np.array(list("abcd"))
    rng = np.random.default_rng(0)
    tr = _train(tmp_path, "iid", "".join(rng.choice(chars, 40_000, p=p)), "data.eos=none", "train.max_steps=200")
    sample = rng.choice(4, 20_000, p=p)
    (tmp_path / "eval.txt").write_text("".join(chars[sample]))
    res = perplexity(tr.model, tr.vocab, tr.tokenizer, tmp_path / "eval.txt")
    entropy_ppl = math.exp(-(p * np.log(p)).sum())                # 3.3467
    true_on_sample = math.exp(-np.log(p[sample]).mean())        # the true distribution on this very text
    assert res["tokens"] == 20_000
    assert abs(res["ppl"] / entropy_ppl - 1) < 0.03, (res["ppl"], entropy_ppl)
    assert res["ppl"] >= true_on_sample * 0.998, (res["ppl"], true_on_sample)


# -- words and word_ppl at char level --------------------------------------------------------------

from rnnlm.evaluate import WORD_SPACE_MIN, _word_count  # noqa: E402


def _ids(text: str, vocab: Vocab, tok: Tokenizer) -> np.ndarray:
    return np.asarray(text_ids(text, tok, vocab))


@pytest.mark.parametrize("eos", ["line", "none"])
def test_word_count_known_answers(eos):
    vocab, tok = char_setup(eos)
    ids = _ids("ab cd  e\nfgh a\n", vocab, tok)
    eos_tokens = int(np.count_nonzero(ids == EOS_ID))
    assert _word_count(ids, vocab) == 5 + eos_tokens    # ab, cd, e, fgh, a (+ the <eos> tokens)


@pytest.mark.parametrize("eos", ["line", "none"])
def test_text_without_spaces_has_no_word_count(eos):
    """Chinese poetry, DNA...: runs of characters between line breaks are lines, not words."""
    vocab, tok = Vocab([UNK, EOS, *"床前明月光疑是地上霜 \n"]), Tokenizer(level="char", eos=eos)
    assert _word_count(_ids("床前明月光\n疑是地上霜\n" * 20, vocab, tok), vocab) is None


def test_word_count_threshold_is_the_share_of_inline_spaces():
    vocab, tok = char_setup("none")
    n = 400                                                # characters on each line, breaks aside
    for spaces, counted in ((int(n * WORD_SPACE_MIN) - 1, False), (int(n * WORD_SPACE_MIN) + 1, True)):
        line = ("a" * (n // spaces - 1) + " ") * spaces
        line = (line + "b" * n)[:n]
        assert line.count(" ") == spaces
        assert (_word_count(_ids(line + "\n", vocab, tok), vocab) is not None) == counted


def test_perplexity_reports_word_ppl_only_for_space_separated_text(tmp_path):
    vocab, tok = char_setup()
    model = random_model(len(vocab))
    spaced, solid = tmp_path / "spaced.txt", tmp_path / "solid.txt"
    spaced.write_text("abc de fgh\nab c\n", encoding="utf-8")
    solid.write_text("abcdefgh\nhgfedcba\n", encoding="utf-8")
    r = perplexity(model, vocab, tok, spaced)
    assert r["words"] == 5 + 2 and math.isclose(r["word_ppl"], math.exp(r["nll"] / 7), rel_tol=1e-9)
    r = perplexity(model, vocab, tok, solid)
    assert "words" not in r and "word_ppl" not in r and r["bpc"] > 0


def test_library_arguments_are_checked_with_usage_errors(tmp_path):
    from rnnlm.errors import UsageError
    vocab, tok = char_setup()
    model = random_model(len(vocab), seed=3)
    path = tmp_path / "e.txt"
    path.write_text(random_text(3, seed=3))
    for kw in ({"batch_size": 0}, {"batch_size": -3}, {"batch_size": 2.5}, {"progress": "bogus"}):
        with pytest.raises(UsageError):
            perplexity(model, vocab, tok, path, **kw)
    # an unknown error handler is refused before reading, even for a file with no bad byte in it
    for bad in ("bogus", None, "xmlcharrefreplace"):   # the last handles encoding only
        with pytest.raises(UsageError, match="error handler"):
            perplexity(model, vocab, tok, path, errors=bad)
    assert perplexity(model, vocab, tok, path, errors="replace")["tokens"] > 0
    with pytest.raises(UsageError, match="list of sentences"):
        score_sentences(model, vocab, tok, "abc")                    # not 3 one-letter sentences
    for bad in ([None], ["ab", 3]):
        with pytest.raises(UsageError, match="strings"):
            score_sentences(model, vocab, tok, bad)
    with pytest.raises(UsageError, match="batch_size"):
        score_sentences(model, vocab, tok, ["ab"], batch_size=0)
    model.train()
    h, _ = model(torch.tensor([[2], [3]]), None, 0)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="reduction"):
            model.nll(h, torch.tensor([[3], [4]]), reduction="bogus")
