"""The GPU path: on CUDA the model, the fused loss and training give the CPU's fp32 answers;
bf16 and fp16 (GradScaler) train; resume is exact; checkpoints move between devices; sampling
draws the right distribution; torch.compile and DDP over NCCL run.

Skipped without a CUDA device. On a machine with one: ``python -m pytest tests/test_cuda.py``.
``RNNLM_TEST_DEVICE=cpu`` runs the same checks with the CPU in the GPU's place (a check of the
tests themselves: the device-vs-CPU comparisons are then met trivially; fp16 and NCCL skip).
``RNNLM_TEST_DEVICE=mps`` runs them on Apple silicon (the CUDA-only ones skip; never run so far).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnnlm.checkpoint import load_checkpoint, load_model
from rnnlm.config import ModelConfig, build_config
from rnnlm.evaluate import perplexity
from rnnlm.models import RNNLM, Dropout, make_rnn, run_layerwise
from rnnlm.ops import linear_cross_entropy
from rnnlm.sample import Sampler
from rnnlm.text import EOS, UNK, Tokenizer, Vocab
from rnnlm.train import Trainer

DEV = os.environ.get("RNNLM_TEST_DEVICE", "cuda")
CUDA = DEV == "cuda"
pytestmark = pytest.mark.skipif(
    CUDA and not torch.cuda.is_available(),
    reason="needs a CUDA device: run `python -m pytest tests/test_cuda.py` on a machine with one")
needs_cuda = pytest.mark.skipif(not CUDA, reason="fp16 autocast and NCCL exist on CUDA only")

@pytest.fixture(autouse=True)
def _true_fp32():
    """Compare real fp32 arithmetic: PyTorch lets cuDNN use TF32 by default (10-bit mantissas
    inside the LSTM), which these known-answer checks would mistake for a bug."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture()
def corpus(word_corpus) -> Path:
    return word_corpus


def _cfg(corpus: Path, device: str, *extra: str):
    return build_config(None, [f"data.path={corpus}", "data.level=word", "model.hidden_size=32",
                               "model.embedding_size=16", "model.num_layers=2", "train.batch_size=4",
                               "train.bptt=8", "train.log_every=5", "train.eval_every=10",
                               "train.eval_max_tokens=400", f"train.device={device}", *extra])


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _fit(corpus: Path, run: Path, device: str, *extra: str) -> dict:
    return Trainer(_cfg(corpus, device, *extra), run, progress=False).fit()


# -- the model and the loss ----------------------------------------------------------------------

MODELS = {
    "rnn_tanh": dict(cell="rnn_tanh"),
    "rnn_relu": dict(cell="rnn_relu"),
    "gru": dict(cell="gru"),
    "lstm": dict(cell="lstm"),
    "lstm_peephole": dict(cell="lstm_peephole"),
    "bidirectional": dict(cell="lstm", bidirectional=True),
    "tied+head": dict(cell="gru", tie_weights=True, head_layers=1),
    "adaptive": dict(cell="lstm", softmax="adaptive", adaptive_cutoffs=[20, 60]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_on_device_gives_the_cpu_loss_and_gradients(name):
    torch.manual_seed(0)
    V = 97
    cpu = RNNLM(V, ModelConfig(hidden_size=24, embedding_size=16, num_layers=2, dropout=0.0, **MODELS[name]))
    dev = copy.deepcopy(cpu).to(DEV)
    x, y = torch.randint(0, V, (11, 3)), torch.randint(0, V, (11, 3))

    def run(m: RNNLM, device: str):
        xd, yd = x.to(device), y.to(device)
        loss = sum(m.nll(m(xd, None, direction=d)[0], yd) for d in range(m.num_directions))  # training loss
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        with torch.no_grad():
            h, state = m(xd)
            return loss.detach(), grads, m.log_probs(h), m.nll(h, yd), state  # evaluation path

    want, got = run(cpu, "cpu"), run(dev, DEV)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=0)
    for (pname, _), g, w in zip(cpu.named_parameters(), got[1], want[1]):
        assert (g is None) == (w is None), pname
        if w is not None:
            torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=pname)
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3].cpu(), want[3], rtol=1e-5, atol=0)
    for s, t in zip(got[4] if isinstance(got[4], tuple) else (got[4],),
                    want[4] if isinstance(want[4], tuple) else (want[4],)):
        torch.testing.assert_close(s.cpu(), t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_layerwise_path_on_device_equals_the_module_without_warnings(cell):
    """Training with dropout runs the stack one layer at a time (run_layerwise). On CUDA the layers
    above the first are re-packed for cuDNN on each call; the results are the module's, and
    PyTorch's warning about the re-packing does not reach the user."""
    torch.manual_seed(1)
    rnn = make_rnn(cell, 16, 24, 3, 0.0).to(DEV)
    x = torch.randn(9, 4, 16, device=DEV)
    want, want_state = rnn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "RNN module weights are not part of single contiguous chunk"
        got, got_state = run_layerwise(rnn, x, None, Dropout(0.0))
        grads = torch.autograd.grad(got.sum(), list(rnn.parameters()))
    want_grads = torch.autograd.grad(want.sum(), list(rnn.parameters()))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for s, t in zip(got_state if isinstance(got_state, tuple) else (got_state,),
                    want_state if isinstance(want_state, tuple) else (want_state,)):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_cross_entropy_on_device_against_float64(dtype):
    """The PTB-sized fused linear + cross-entropy (700 x 200 x 10,000) under each precision."""
    if dtype == torch.float16 and not CUDA:
        pytest.skip("fp16 autocast is the CUDA recipe")
    g = torch.Generator().manual_seed(3)
    N, D, V = 700, 200, 10_000
    h = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.15).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    ref = F.cross_entropy(F.linear(h, W, b), y)
    ref_grads = torch.autograd.grad(ref, [h, W, b])
    leaves = [t.detach().float().to(DEV).requires_grad_() for t in (h, W, b)]
    with torch.autocast(torch.device(DEV).type, dtype=dtype, enabled=dtype != torch.float32):
        loss = linear_cross_entropy(*leaves, y.to(DEV))
    loss.backward()
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
        for t, r in zip(leaves, ref_grads):
            torch.testing.assert_close(t.grad.cpu().double(), r, rtol=1e-3, atol=1e-4 * float(r.abs().max()))
    else:
        assert abs(loss.item() - ref.item()) / ref.item() < 5e-3
        for t, r in zip(leaves, ref_grads):
            assert torch.isfinite(t.grad).all()
            assert F.cosine_similarity(t.grad.cpu().double().flatten(), r.flatten(), dim=0) > 0.995


# -- training --------------------------------------------------------------------------------------

def test_training_on_device_follows_the_cpu_curve(corpus, tmp_path):
    """40 SGD steps in fp32: the device's loss curve and validations are the CPU's (the CPU takes
    the fused clip + SGD route with a sparse embedding gradient, CUDA torch.optim.SGD)."""
    common = ("model.dropout=0.0", "train.optimizer=sgd", "train.lr=1.0", "train.max_steps=40")
    _fit(corpus, tmp_path / "cpu", "cpu", *common)
    _fit(corpus, tmp_path / "dev", DEV, *common)
    a, b = _events(tmp_path / "cpu", "train"), _events(tmp_path / "dev", "train")
    assert len(a) == len(b) == 8
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], abs=1e-3)
    assert [e["grad_norm"] for e in b] == pytest.approx([e["grad_norm"] for e in a], rel=1e-3)
    va, vb = _events(tmp_path / "cpu", "eval"), _events(tmp_path / "dev", "eval")
    assert len(va) == len(vb) == 4
    assert [e["loss"] for e in vb] == pytest.approx([e["loss"] for e in va], abs=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_device_trains_like_fp32(corpus, tmp_path, precision):
    if precision == "fp16" and not CUDA:
        pytest.skip("train.precision=fp16 needs CUDA")
    common = ("model.dropout=0.0", "train.optimizer=adam", "train.lr=0.01", "train.max_steps=60")
    full = _fit(corpus, tmp_path / "fp32", DEV, *common, "train.precision=fp32")
    amp = _fit(corpus, tmp_path / precision, DEV, *common, f"train.precision={precision}")
    assert amp["best_valid_loss"] < 2.8  # learned: a uniform guess is log 18 = 2.89, the text's entropy ~2.7
    assert amp["best_valid_loss"] == pytest.approx(full["best_valid_loss"], abs=0.05)
    losses = [e["loss"] for e in _events(tmp_path / precision, "train")]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    scaler = load_checkpoint(tmp_path / precision / "last.pt")["trainer"]["scaler"]
    if precision == "fp16":  # GradScaler on, its scale saved for resume
        assert scaler["scale"] > 0
    else:
        assert not scaler


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_on_device_is_exact(corpus, tmp_path, precision):
    """Interrupted at step 20 and resumed, a run with dropout (device RNG) and Adam ends where the
    uninterrupted run ends; under fp16 the GradScaler's state comes back too."""
    if precision == "fp16" and not CUDA:
        pytest.skip("train.precision=fp16 needs CUDA")
    common = ("model.dropout=0.3", "train.optimizer=adam", "train.lr=0.01", f"train.precision={precision}")
    full = _fit(corpus, tmp_path / "full", DEV, "train.max_steps=40", *common)
    _fit(corpus, tmp_path / "part", DEV, "train.max_steps=20", *common)
    resumed = Trainer(build_config(None, ["train.max_steps=40"]), tmp_path / "part", resume=True,
                      progress=False).fit()
    assert resumed["step"] == full["step"] == 40
    a = [e["loss"] for e in _events(tmp_path / "full", "eval")]
    b = [e["loss"] for e in _events(tmp_path / "part", "eval")]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-6, abs=0)
    sa = load_checkpoint(tmp_path / "full" / "last.pt")["trainer"]["scaler"]
    sb = load_checkpoint(tmp_path / "part" / "last.pt")["trainer"]["scaler"]
    assert sa == sb


def test_checkpoint_trained_on_device_evaluates_alike_on_cpu(corpus, tmp_path):
    _fit(corpus, tmp_path / "run", DEV, "train.max_steps=20", "model.dropout=0.2")
    on_cpu, on_dev = load_model(tmp_path / "run" / "best.pt", "cpu"), load_model(tmp_path / "run" / "best.pt", DEV)
    assert next(on_dev.model.parameters()).device.type == torch.device(DEV).type
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    r_cpu = perplexity(on_cpu.model, on_cpu.vocab, on_cpu.tokenizer, corpus, batch_size=4, device="cpu")
    r_dev = perplexity(on_dev.model, on_dev.vocab, on_dev.tokenizer, corpus, batch_size=4, device=DEV)
    assert r_cpu["tokens"] == r_dev["tokens"] > 10_000
    assert r_dev["ppl"] == pytest.approx(r_cpu["ppl"], rel=1e-5)


def test_batched_evaluation_in_tf32_gives_the_batch_one_number(corpus, tmp_path):
    """PyTorch's default lets cuDNN's LSTM run fp32 in TF32: the exactness check of a batched
    evaluation then compares states at TF32's tolerance (held to fp32's, every piece re-ran to
    its end, sequentially), and the batched number is still the batch-1 number."""
    from rnnlm.evaluate import stream_nll, text_ids
    _fit(corpus, tmp_path / "run", DEV, "train.max_steps=40")
    loaded = load_model(tmp_path / "run" / "best.pt", DEV)
    ids = text_ids(corpus.read_text(), loaded.tokenizer, loaded.vocab)
    torch.backends.cudnn.allow_tf32 = True
    one = stream_nll(loaded.model, ids, batch_size=1, device=DEV)
    info: dict = {}
    many = stream_nll(loaded.model, ids, batch_size=16, device=DEV, burn_in=64, info=info)
    assert info["pieces"] == 16
    assert many == pytest.approx(one, rel=1e-4)
    print(f"tf32: {info['rerun_tokens']} of {len(ids)} tokens re-run")


@pytest.mark.parametrize("name", ["lstm", "gru", "lstm_peephole", "bidirectional", "adaptive"])
def test_cache_and_dynamic_evaluation_on_device_give_the_cpus_numbers(name):
    """The continuous cache (similarities and mixture on the device) and dynamic evaluation (SGD
    steps on the device, cuDNN off for the recurrent backward) agree with the CPU."""
    import numpy as np
    from rnnlm.cache import CacheSpec
    from rnnlm.dynamic import DynamicSpec
    from rnnlm.evaluate import evaluate_ids
    torch.manual_seed(1)
    V = 97
    cpu = RNNLM(V, ModelConfig(hidden_size=24, embedding_size=16, num_layers=2, dropout=0.3, **MODELS[name])).eval()
    dev = copy.deepcopy(cpu).to(DEV)
    ids = np.random.default_rng(1).integers(0, V, 700)
    kw = dict(batch_size=4, cache=CacheSpec(200, (0.0, 1.0), (0.0, 0.3)), dynamic=DynamicSpec((0.0, 0.5), 0.1, 16))
    want, got = evaluate_ids(cpu, ids, device="cpu", **kw), evaluate_ids(dev, ids, device=DEV, **kw)
    for key in ("cache", "dynamic"):
        for g, w in zip(got[key], want[key]):
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (key, g, w)
    assert got["dynamic"][0]["loss"] == pytest.approx(got["loss"], rel=1e-5)       # lr 0: the static number
    assert all(torch.equal(p.cpu(), q) for p, q in zip(dev.parameters(), cpu.parameters()))   # left as it was


def test_scores_on_device_equal_the_cpus(corpus, tmp_path):
    from rnnlm.evaluate import score_sentences
    _fit(corpus, tmp_path / "run", DEV, "train.max_steps=20")
    on_cpu, on_dev = load_model(tmp_path / "run" / "best.pt", "cpu"), load_model(tmp_path / "run" / "best.pt", DEV)
    sentences = ["the cat sat", "a big red dog ran far away quickly", "zebra on a mat", ""]
    want = score_sentences(on_cpu.model, on_cpu.vocab, on_cpu.tokenizer, sentences, "cpu", batch_size=2)
    got = score_sentences(on_dev.model, on_dev.vocab, on_dev.tokenizer, sentences, DEV, batch_size=2)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want] == [4, 9, 5, 1]
    assert [g["oov"] for g in got] == [w["oov"] for w in want] == [0, 0, 1, 0]
    assert [g["logprob"] for g in got] == pytest.approx([w["logprob"] for w in want], rel=1e-5)


# -- sampling -------------------------------------------------------------------------------------

def _fixed_model(probs: list[float]) -> RNNLM:
    """Next-token distribution `probs` whatever the context."""
    m = RNNLM(len(probs), ModelConfig(hidden_size=4, embedding_size=4, num_layers=1))
    with torch.no_grad():
        m.decoder.weight.zero_()
        m.decoder.bias.copy_(torch.tensor([math.log(p) for p in probs]))
    return m.eval()


def test_sampling_on_device_draws_the_distribution_without_unk():
    vocab = Vocab([UNK, EOS, *"abcd"])
    probs = [0.5, 0.1, 0.2, 0.1, 0.06, 0.04]          # <unk> most probable: it must never be drawn
    s = Sampler(_fixed_model(probs).to(DEV), vocab, Tokenizer(level="char", eos="line"), device=DEV)
    n = 5000
    got = s.generate("", n, 1, seed=0)
    counts = Counter(EOS if x.stop == "eos" else x.generated for x in got)
    assert set(counts) <= {EOS, *"abcd"}
    expected = {EOS: 0.2, "a": 0.4, "b": 0.2, "c": 0.12, "d": 0.08}  # renormalised without <unk>
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in expected.items())
    assert chi2 < 23.5  # 4 degrees of freedom: exceeded with probability 1e-4
    again = s.generate("", n, 1, seed=0)
    assert [x.generated for x in again] == [x.generated for x in got]  # the seed decides


def test_greedy_samples_agree_between_cpu_and_device():
    torch.manual_seed(4)
    vocab = Vocab([UNK, EOS, *"abcdefghijklmnop"])
    model = RNNLM(len(vocab), ModelConfig(hidden_size=24, embedding_size=12, num_layers=2)).eval()
    tok = Tokenizer(level="char", eos="none")
    want = Sampler(model, vocab, tok).generate("abc", 2, 60, greedy=True)
    got = Sampler(copy.deepcopy(model).to(DEV), vocab, tok, device=DEV).generate("abc", 2, 60, greedy=True)
    assert [x.text for x in got] == [x.text for x in want]
    assert all(x.tokens == 60 for x in got)


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_bf16_sampling_on_device_follows_fp32(softmax, monkeypatch):
    """`--precision bf16` on the device: every matrix (forced large enough) a bfloat16 product
    (cuBLAS on CUDA, oneDNN on CPU), scores within bfloat16's rounding of the fp32 ones, not equal."""
    import rnnlm.sample as sample_mod
    from rnnlm.ops import _packed_weights_ok

    if DEV == "cpu" and not _packed_weights_ok():
        pytest.skip("no oneDNN packed product on this CPU: bf16 products are not used")
    for name in ("_PACK_MIN_ENTRIES", "_BF16_MIN_ENTRIES", "_BF16_MIN_COLUMNS"):
        monkeypatch.setattr(sample_mod, name, 0)
    torch.manual_seed(6)
    V = 140 if softmax == "adaptive" else 30
    model = RNNLM(V, ModelConfig(hidden_size=48, embedding_size=16, num_layers=2, softmax=softmax,
                                 adaptive_cutoffs=[40] if softmax == "adaptive" else None)).eval().to(DEV)
    scores = {}
    with torch.inference_mode():
        for prec in ("fp32", "bf16"):
            step = sample_mod._Stepper(model, torch.device(DEV), 2, prec)
            kinds = {type(step.decoder or step.adaptive.head).__name__}
            assert ("_BF16" in kinds) == (prec == "bf16"), kinds
            step.start([1, 5, 7], 2)
            for ids in ([3, 4], [9, 2], [6, 6]):
                step.advance(torch.tensor(ids, device=DEV))
            scores[prec] = torch.log_softmax(step.scores().float(), -1).cpu()
    diff = float((scores["bf16"] - scores["fp32"]).abs().max())
    assert 0 < diff < 0.1, diff


# -- CUDA graphs (train.cuda_graphs) ---------------------------------------------------------------

GRAPHED = {
    "lstm-dropout-sgd": ("model.dropout=0.3", "train.optimizer=sgd", "train.lr=1.0"),
    "lstm-bf16-adam": ("model.dropout=0.2", "train.precision=bf16", "train.optimizer=adam", "train.lr=0.01"),
    "gru-bidirectional": ("model.cell=gru", "model.bidirectional=true", "model.dropout=0.2"),
    "peephole-resets": ("model.cell=lstm_peephole", "model.dropout=0.2", "train.state_resets=true"),
    "tied-head-1layer": ("model.num_layers=1", "model.tie_weights=true", "model.head_layers=1",
                         "train.clip_grad_norm=null"),
    "awd-regularisers": ("model.locked_dropout=true", "model.dropout=0.3", "model.dropout_input=0.4",
                         "model.dropout_embedding=0.1", "model.weight_drop=0.5", "train.ar=2", "train.tar=1",
                         "train.optimizer=sgd", "train.lr=1.0"),
}


def _trainer(corpus: Path, run: Path, *extra: str) -> Trainer:
    return Trainer(_cfg(corpus, DEV, *extra), run, progress=False)


@needs_cuda
@pytest.mark.parametrize("name", list(GRAPHED))
def test_cuda_graph_training_equals_eager_training(corpus, tmp_path, name):
    """The same run with each step replayed from a CUDA graph and with eager steps: the same
    losses and weights (dropout masks from the same generator), across an epoch boundary with its
    short last window, which runs eagerly into the graph's gradient buffers."""
    extra = (*GRAPHED[name], "train.bptt=7", "train.batch_size=64", "train.epochs=2", "train.max_steps=null",
             "train.eval_every=null")
    eager = _trainer(corpus, tmp_path / "eager", *extra, "train.cuda_graphs=false")
    eager.fit()
    graphed = _trainer(corpus, tmp_path / "graphed", *extra)  # null: on where it applies
    graphed.fit()
    g = graphed.graphed
    assert eager.graphed is None and g is not None and not g.failed
    assert g.replays == 2 * graphed.n_windows - g.warm - 2  # each epoch's last window is short
    la = [e["loss"] for e in _events(tmp_path / "eager", "train") + _events(tmp_path / "eager", "eval")]
    lb = [e["loss"] for e in _events(tmp_path / "graphed", "train") + _events(tmp_path / "graphed", "eval")]
    tol = 1e-6 if "bf16" not in name else 1e-3
    assert lb == pytest.approx(la, rel=tol, abs=0), max(abs(a - b) for a, b in zip(la, lb))
    wa, wb = eager.model.state_dict(), graphed.model.state_dict()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= (1e-5 if "bf16" not in name else 1e-2), worst


@needs_cuda
def test_cuda_graphs_on_a_second_gpu_equal_eager_training(corpus, tmp_path):
    """train.device=cuda:1 in one process (the current device stays cuda:0): the capture must use
    cuda:1's streams, or it records nothing."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    extra = ("model.dropout=0.2", "train.device=cuda:1", "train.max_steps=30", "train.eval_every=null")
    eager = _trainer(corpus, tmp_path / "eager", *extra, "train.cuda_graphs=false")
    eager.fit()
    graphed = _trainer(corpus, tmp_path / "graphed", *extra)
    graphed.fit()
    assert graphed.graphed is not None and not graphed.graphed.failed and graphed.graphed.replays > 0
    la, lb = (_events(tmp_path / r, "train") for r in ("eager", "graphed"))
    assert [e["loss"] for e in lb] == pytest.approx([e["loss"] for e in la], rel=1e-6, abs=0)


@needs_cuda
def test_cuda_graphs_stay_off_where_they_do_not_apply(corpus, tmp_path):
    for extra in (("train.precision=fp16",), ("model.softmax=adaptive", "model.adaptive_cutoffs=[20,60]"),
                  ("train.cuda_graphs=false",)):
        t = _trainer(corpus, tmp_path / "_".join(extra).replace("=", "-").replace("[", "").replace("]", ""),
                     *extra, "train.max_steps=6")
        assert t.graphed is None, extra
        t.fit()


# -- compile and DDP -------------------------------------------------------------------------------

def test_compiled_training_on_device_matches_eager(corpus, tmp_path):
    common = ("model.dropout=0.0", "train.optimizer=sgd", "train.lr=1.0", "train.max_steps=20")
    _fit(corpus, tmp_path / "eager", DEV, *common)
    _fit(corpus, tmp_path / "compiled", DEV, *common, "train.compile=true")
    a, b = _events(tmp_path / "eager", "train"), _events(tmp_path / "compiled", "train")
    assert len(a) == len(b) == 4
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], abs=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_cuda
@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_on_cuda_runs_ddp_over_nccl(corpus, tmp_path, nproc):
    """torchrun on CUDA: one process per GPU, NCCL, the single-process loss curve (same global
    batch). One GPU runs the one-process case, which RNNLM_FORCE_DDP=1 sends down the DDP + NCCL path."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs (NCCL takes one rank per GPU)")
    args = [f"--data={corpus}", "data.level=word", "model.hidden_size=32", "model.embedding_size=16",
            "train.batch_size=4", "train.bptt=8", "train.max_steps=12", "train.log_every=1", "train.eval_every=6",
            "train.optimizer=sgd", "train.lr=0.5", "model.dropout=0.0", "train.device=cuda"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RNNLM_FORCE_DDP": "1"}
    single = subprocess.run([sys.executable, "-m", "rnnlm", "train", "--out", str(tmp_path / "s"), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "rnnlm", "train", "--out", str(tmp_path / "d"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    said = " ".join((ddp.stdout + ddp.stderr).split())
    assert f"{nproc} process{'es' if nproc > 1 else ''} (nccl)" in said
    a, b = _events(tmp_path / "s", "train"), _events(tmp_path / "d", "train")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-3 and x["tokens"] == y["tokens"]
    va, vb = _events(tmp_path / "s", "eval"), _events(tmp_path / "d", "eval")
    assert [e["loss"] for e in vb] == pytest.approx([e["loss"] for e in va], abs=1e-3)
