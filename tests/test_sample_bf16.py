"""Sampling with ``precision="bf16"``: large matrices read in bfloat16.

What is promised: the products are float32 arithmetic on operands rounded to bfloat16, with the
output rounded to bfloat16 once (a relative error of at most 2^-8 per entry), then the float32
bias; the scores follow fp32's within that rounding; small matrices, the states and the draws
stay float32; a bad precision is one clear error.
"""

from __future__ import annotations

import json

import pytest
import torch

import rnnlm.sample as sample_mod
from rnnlm import ops
from rnnlm.cli import app
from rnnlm.config import ModelConfig
from rnnlm.errors import UsageError
from rnnlm.models import RNNLM
from rnnlm.sample import Sampler, _Stepper
from rnnlm.text import EOS_ID, UNK, EOS, Tokenizer, Vocab

CPU = torch.device("cpu")

needs_onednn = pytest.mark.skipif(not ops._packed_weights_ok(),
                                  reason="oneDNN's packed linear is unavailable or failed its check in this "
                                         "PyTorch build: bf16 products are not used on this CPU")


def random_model(V: int, cell: str = "lstm", seed: int = 0, **kw) -> RNNLM:
    torch.manual_seed(seed)
    args = dict(cell=cell, hidden_size=24, embedding_size=12, num_layers=2)
    args.update(kw)
    return RNNLM(V, ModelConfig(**args)).eval()


def bf16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bfloat16 and back: the operand the product sees."""
    return t.to(torch.bfloat16).float()


@needs_onednn
@pytest.mark.parametrize("N,K,B", [(12, 5, 1), (13, 7, 3), (512, 256, 1), (2048, 96, 4)])
def test_bf16_product_is_float32_arithmetic_on_rounded_operands(N, K, B):
    """Own bias, a bias per call and per-row biases from a split table; the result is float32 and
    within one bfloat16 rounding of the exact product of the rounded operands -- and it is not the
    float32 product (the weights really are read in bfloat16)."""
    g = torch.Generator().manual_seed(N + K + B)
    w, b, x = torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(B, K, generator=g)
    prod = sample_mod._BF16(w, b)
    exact = bf16(x).double() @ bf16(w).double().t()            # what the product computes, before rounding
    # one rounding to bfloat16 of the output, plus float32 accumulation over K terms (which matters
    # only where the sum nearly cancels): 2^-24 per addition on partial sums up to max |exact|
    bound = 2 ** -8 * exact.abs() + K * 2 ** -24 * float(exact.abs().max())

    def within(got, bias):
        return got.dtype == torch.float32 and bool(((got.double() - exact - bias.double()).abs() <= bound).all())

    assert within(prod(x), b)
    other = torch.randn(N, generator=g)
    assert within(prod(x, prod.split(other)), other)
    table = torch.randn(6, N, generator=g)
    ids = torch.randint(0, 6, (B,), generator=g)
    assert within(prod(x, prod.rows(prod.split(table), ids)), table[ids])
    if N * K >= 4096:  # enough entries that float32 and bfloat16 cannot agree by chance everywhere
        assert not torch.equal(prod(x), torch.nn.functional.linear(x, w, b))
    for bias in (None, prod.split(other)):                         # written into a given tensor
        out = torch.full((B, N), float("nan"))
        prod.into(out, x, bias)
        assert torch.equal(out, prod(x, bias))


@needs_onednn
def test_bf16_is_chosen_for_large_matrices_only(monkeypatch):
    """bf16 from 2^20 weights and 256 columns on (smaller or narrower matrices are faster in float32
    at batch 1); float32 products otherwise, and always under precision fp32."""
    small, large = torch.randn(30, 40), torch.randn(2048, 512)
    middle, narrow = torch.randn(800, 400), torch.randn(8000, 200)        # 320k weights; 200 columns
    for batch in (1, 2, 16):
        assert type(sample_mod._product(large, None, CPU, batch, "bf16")) is sample_mod._BF16
        assert type(sample_mod._product(small, None, CPU, batch, "bf16")) is sample_mod._Addmm
        for m in (middle, narrow):
            assert type(sample_mod._product(m, None, CPU, batch, "bf16")) is type(
                sample_mod._product(m, None, CPU, batch, "fp32"))
        assert type(sample_mod._product(large, None, CPU, batch, "fp32")) is not sample_mod._BF16
    # a oneDNN that miscomputes this matrix: it stays float32
    monkeypatch.setattr(sample_mod, "linear_onednn", lambda x, w, b=None: torch.zeros(x.size(0), w.size(0),
                                                                                     dtype=x.dtype))
    assert type(sample_mod._product(large, None, CPU, 1, "bf16")) is sample_mod._Gemv
    # no oneDNN at all: PyTorch's plain bfloat16 matmul is slower than float32 on CPU, so float32
    monkeypatch.setattr(sample_mod, "_packed_weights_ok", lambda: False)
    assert type(sample_mod._product(large, None, CPU, 1, "bf16")) is sample_mod._Gemv


def _all_bf16(monkeypatch):
    """Every matrix large enough for a bf16 product (the test models are small)."""
    for name in ("_PACK_MIN_ENTRIES", "_BF16_MIN_ENTRIES", "_BF16_MIN_COLUMNS"):
        monkeypatch.setattr(sample_mod, name, 0)


@needs_onednn
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "lstm_peephole"])
@pytest.mark.parametrize("table,extra", [(True, {}), (False, {}),
                                         (True, {"head_layers": 1, "tie_weights": True})])
def test_bf16_stack_follows_the_fp32_model(cell, table, extra, monkeypatch):
    """Stepped in bf16 (every product, batch 3 then 1, with and without layer 0's token table, and
    with a head layer and tied weights) the log-probabilities stay within bfloat16's rounding of
    model.forward in fp32 over many steps, and are not identical to them."""
    _all_bf16(monkeypatch)
    if not table:
        monkeypatch.setattr(sample_mod, "_TABLE_MAX_ENTRIES", 0)
    m = random_model(31, cell, num_layers=2, seed=3, **extra)
    ctx = [EOS_ID, 5, 7, 3]
    steps = torch.randint(2, 31, (12, 3), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for batch in (3, 1):
            step = _Stepper(m, CPU, batch, "bf16")
            products = [step.decoder, *getattr(step.stack, "gemvs", []), *getattr(step.stack, "hh", []),
                        *(p for p in getattr(step.stack, "ih", []) if p is not None)]
            assert step.stack is not None and (step.table is not None) == table
            assert all(type(p) is sample_mod._BF16 for p in products)
            step.start(ctx, batch)
            x = torch.tensor(ctx).unsqueeze(1).expand(-1, batch)
            worst = 0.0
            for nxt in steps[:, :batch]:
                step.advance(nxt)
                x = torch.cat([x, nxt.unsqueeze(0)])
                h, _ = m(x)
                got = torch.log_softmax(step.scores(), -1)
                assert got.dtype == torch.float32
                worst = max(worst, float((got - m.log_probs(h[-1])).abs().max()))
            assert 0 < worst < 0.05, worst


@needs_onednn
@pytest.mark.parametrize("extra", [{"bidirectional": True}, {"softmax": "adaptive", "adaptive_cutoffs": [40]}])
def test_bf16_bidirectional_and_adaptive(extra, monkeypatch):
    """A recurrent module that is not stepped by hand (bidirectional: its forward direction, run by
    the model under bf16 autocast, which on CPU leaves nn.LSTM in float32; a bf16 output layer) and
    an adaptive softmax (head and tails as bf16 products) give scores close to fp32's, not identical."""
    _all_bf16(monkeypatch)
    V = 140 if extra.get("softmax") else 31
    m = random_model(V, seed=5, **extra)
    ctx, nxt = [EOS_ID, 5, 7, 3], torch.tensor([4, 9])
    got = {}
    with torch.inference_mode():
        for prec in ("fp32", "bf16"):
            step = _Stepper(m, CPU, 2, prec)
            step.start(ctx, 2)
            step.advance(nxt)
            got[prec] = torch.log_softmax(step.scores().float(), -1)
    diff = float((got["bf16"] - got["fp32"]).abs().max())
    # autocast rounds the head's and the cluster's logits to bfloat16 (2^-9 of each, relative), and
    # a tail token's log-probability sums two of them: a few hundredths here (a wrong weight: > 1)
    assert 0 < diff < 0.1, diff


def test_sampler_refuses_an_unknown_precision():
    vocab = Vocab([UNK, EOS, *"abc"])
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16"):
        Sampler(random_model(len(vocab)), vocab, Tokenizer("char"), precision="fp16")


@needs_onednn
def test_sampler_prepares_each_precision_and_samples_valid_text(monkeypatch):
    """Two samplers of one model, fp32 and bf16: each its own products; both give text of the
    vocabulary, reproducible by seed; greedy text of a small random model is the same (its argmax
    is far from a tie)."""
    _all_bf16(monkeypatch)
    vocab = Vocab([UNK, EOS, *"abcdefgh"])
    m = random_model(len(vocab), seed=7)
    tok = Tokenizer("char")
    fp32, half = Sampler(m, vocab, tok), Sampler(m, vocab, tok, precision="bf16")
    a = half.generate("ab", 3, 40, seed=2)
    assert a == half.generate("ab", 3, 40, seed=2)
    assert all(set(s.generated) <= set("abcdefgh\n") for s in a)
    assert type(half._stepper(3).decoder) is sample_mod._BF16
    assert type(fp32._stepper(3).decoder) is not sample_mod._BF16


def _train_tiny(tmp_path, monkeypatch, text: str, hidden: int, steps: int, run: str = "run", **sample) -> None:
    """A one-layer char LSTM trained for a few steps on `text`: tmp_path/run (the text in t.txt),
    with `sample` as its config's sample section."""
    from rnnlm.config import Config
    from rnnlm.train import train

    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    cfg = Config()
    cfg.data.train = str(tmp_path / "t.txt")
    cfg.model.hidden_size, cfg.model.embedding_size, cfg.model.num_layers = hidden, hidden // 2, 1
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.bptt, cfg.train.device = steps, 4, 16, "cpu"
    cfg.train.out = str(tmp_path / run)
    for key, value in sample.items():
        setattr(cfg.sample, key, value)
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    train(cfg)


@needs_onednn
def test_cli_sample_precision(tmp_path, monkeypatch):
    """`rnnlm sample --precision bf16` samples through bf16 products; without the option the
    checkpoint's sample.precision decides (fp32 unless the config said bf16); an unknown precision
    is one clear usage error (exit 2)."""
    from typer.testing import CliRunner

    _train_tiny(tmp_path, monkeypatch, "the cat sat on the mat. " * 200, hidden=16, steps=2)
    _train_tiny(tmp_path, monkeypatch, "the cat sat on the mat. " * 200, hidden=16, steps=2, run="run16",
                precision="bf16")
    _all_bf16(monkeypatch)
    made = []
    real = sample_mod._BF16.__init__

    def counting(self, *a, **kw):
        made.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(sample_mod._BF16, "__init__", counting)
    runner = CliRunner()
    r = runner.invoke(app, ["sample", "-m", str(tmp_path / "run"), "--json", "-n", "2", "-l", "20", "--seed", "1",
                            "--precision", "bf16"])
    assert r.exit_code == 0, r.stderr
    assert [json.loads(x)["tokens"] <= 20 for x in r.stdout.splitlines()] == [True, True]
    assert made, "bf16 products were not used"
    made.clear()
    r = runner.invoke(app, ["sample", "-m", str(tmp_path / "run"), "-n", "1", "-l", "5", "--seed", "1"])
    assert r.exit_code == 0 and not made                       # the default is fp32
    r = runner.invoke(app, ["sample", "-m", str(tmp_path / "run16"), "-n", "1", "-l", "5", "--seed", "1"])
    assert r.exit_code == 0 and made                           # the config's sample.precision: bf16
    made.clear()
    r = runner.invoke(app, ["sample", "-m", str(tmp_path / "run16"), "-l", "5", "--precision", "fp32"])
    assert r.exit_code == 0 and not made                       # the option overrides the config
    r = runner.invoke(app, ["sample", "-m", str(tmp_path / "run"), "--precision", "fp16"])
    assert r.exit_code == 2 and "--precision must be one of fp32, bf16" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# -- the scripts that measure it -----------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_bench_generate_times_both_precisions_and_an_adaptive_softmax():
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--vocab", "60", "3000", "--softmax",
           "adaptive", "--hidden", "32", "--layers", "1", "--embedding", "16", "--length", "30", "--repeats", "1",
           "--batch", "1", "2", "--precision", "fp32", "bf16"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["softmax"] == "adaptive"
    rows = report["results"]
    assert len(rows) == 2 * 2 * 3 * 2                          # vocabularies x batches x modes x precisions
    assert {r["precision"] for r in rows} == {"fp32", "bf16"} and all(r["median_tok_s"] > 0 for r in rows)


def test_check_bf16_sampling_reports_the_models_own_perplexity(tmp_path, monkeypatch, capsys):
    """scripts/check_bf16_sampling.py on a small trained model: its fp32 teacher-forced perplexity is
    the model's own (model.forward over the same tokens), bf16's is close, the report is complete."""
    import importlib.util
    import math as _math
    import sys

    from rnnlm.checkpoint import load_model

    text = "the cat sat on the mat and the dog sat on the log. " * 100
    _train_tiny(tmp_path, monkeypatch, text, hidden=32, steps=5)
    _all_bf16(monkeypatch)
    spec = importlib.util.spec_from_file_location("check_bf16_sampling", ROOT / "scripts" / "check_bf16_sampling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["x", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "t.txt"),
                                      "--tokens", "200", "--length", "20", "--repeats", "1", "--greedy-length", "10"])
    mod.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = load_model(tmp_path / "run", "cpu")
    ids = lm.vocab.encode(lm.tokenizer.tokenize(text))[:200]
    with torch.inference_mode():
        x = torch.tensor([EOS_ID] + ids).unsqueeze(1)
        h, _ = lm.model(x[:-1])
        lp = lm.model.log_probs(h[:, 0])
        want = _math.exp(-float(lp.double().gather(1, x[1:]).sum()) / len(ids))
    assert report["tokens"] == 200 and abs(report["ppl_fp32"] - want) < 1e-3 * want
    assert report["ppl_bf16"] != report["ppl_fp32"] and abs(report["ppl_bf16"] - want) < 0.02 * want
    assert 0 < report["max_abs_dlogp"] < 0.1 and report["tok_s_fp32"] > 0 and report["tok_s_bf16"] > 0
    assert 0 <= report["greedy_agree_prefix"] <= report["greedy_tokens"] <= 10
