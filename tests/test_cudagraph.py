"""train.cuda_graphs: the trainer's graph path, checked on the CPU with a simulated graph.

A real CUDA graph needs a GPU (tests/test_cuda.py compares graphed and eager training there).
Here `rnnlm.cudagraph.record` is replaced by a stand-in that keeps the step's body and re-runs it
on `replay()`, reading the same input buffers and writing the gradients of the same parameters:
everything the trainer and :class:`GraphedStep` do around the graph -- warm-up steps, the capture,
the static input buffers, the carried state written back into them, zeros at an epoch's start,
short last windows run eagerly into the kept gradient buffers, state resets, the backward stack of
a bidirectional model, a capture that fails -- must give the eager loop's training, bit for bit.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from rich.console import Console

import rnnlm.cudagraph as cg
from rnnlm.config import build_config
from rnnlm.cudagraph import GraphedStep, graph_blocker
from rnnlm.train import Trainer

@pytest.fixture()
def corpus(tiny_word_corpus) -> Path:
    return tiny_word_corpus


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() re-runs the recorded body. A captured backward
    writes (not adds to) the gradient buffers, so they are zeroed in place first."""
    params: list[torch.Tensor] = []

    def __init__(self):
        self.body = None

    def replay(self):
        for p in FakeGraph.params:
            if p.grad is not None:
                p.grad.zero_()
        self.body()


class FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


@pytest.fixture()
def fake_cuda(monkeypatch):
    """CUDA's stream and graph calls, simulated on the CPU; `recorded` counts the captures."""
    recorded = []

    def record(graph, stream, body):
        # A capture runs the step's Python code -- allocating the gradient buffers -- without
        # computing anything: run it, then put back the random state its dropout masks used.
        rng = torch.get_rng_state()
        body()
        torch.set_rng_state(rng)
        graph.body = body
        recorded.append(graph)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(cg, "record", record)
    return recorded


COMMON = ("data.level=word", "model.hidden_size=24", "model.embedding_size=12", "model.num_layers=2",
          "model.dropout=0.2", "train.batch_size=4", "train.bptt=7", "train.epochs=3", "train.max_steps=null",
          "train.log_every=3", "train.eval_every=null", "train.device=cpu")


def _trainer(corpus: Path, run: Path, graphed: bool, *extra: str, console=None) -> Trainer:
    cfg = build_config(None, [f"data.path={corpus}", *COMMON, *extra])
    t = Trainer(cfg, run, progress=False, console=console)
    # The CPU's fused clip + SGD (sparse embedding gradient) sums in another order: both runs take
    # the loop's general route, which is the one a GPU takes.
    t.fused_sgd = False
    t.model.embedding.sparse = False
    if graphed:
        FakeGraph.params = t.params
        t.graphed = GraphedStep(t.step_module, t.params, t.clip, t._autocast, t.cfg.train.bptt,
                                warn=lambda m: t._log(f"warning: {m}"))
    return t


def _losses(run: Path) -> list[float]:
    import json
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if e["event"] in ("train", "eval")]


def _same_weights(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("extra", [
    ("train.optimizer=sgd", "train.lr=1.0"),
    ("train.optimizer=adam", "train.lr=0.01", "train.state_resets=true"),
    ("model.cell=gru", "model.bidirectional=true", "train.optimizer=adamw", "train.lr=0.01",
     "train.clip_grad_norm=null"),
], ids=["lstm-sgd", "lstm-adam-resets", "gru-bidirectional-adamw"])
def test_graphed_training_equals_eager_training(corpus, tmp_path, fake_cuda, extra):
    eager = _trainer(corpus, tmp_path / "eager", False, *extra)
    eager.fit()
    graphed = _trainer(corpus, tmp_path / "graphed", True, *extra)
    graphed.fit()
    g = graphed.graphed
    assert len(fake_cuda) == 1 and g.graph is not None and not g.failed
    assert g.warm == cg.WARMUP_STEPS
    # every window but the warm-up steps and each epoch's short last window was a replay
    n = graphed.n_windows
    short = (len(graphed.train_data) - 1) % graphed.cfg.train.bptt != 0
    assert short, "the corpus should leave each epoch a short last window"
    assert g.replays == 3 * n - cg.WARMUP_STEPS - 3
    assert graphed.step == eager.step == 3 * n
    assert _losses(tmp_path / "graphed") == _losses(tmp_path / "eager")
    assert _same_weights(graphed, eager)


def test_the_capture_waits_for_a_full_length_window(corpus, tmp_path, fake_cuda):
    """Two windows an epoch, the second short: the step after the warm-up is a short one, and the
    graph is captured at the next full window instead (a graph of the short shape would leave
    every full window eager)."""
    extra = ("train.optimizer=sgd", "train.lr=1.0", "train.bptt=100", "train.epochs=5")
    eager = _trainer(corpus, tmp_path / "eager", False, *extra)
    eager.fit()
    graphed = _trainer(corpus, tmp_path / "graphed", True, *extra)
    assert graphed.n_windows == 2
    graphed.fit()
    g = graphed.graphed
    assert g.key[0] == (101, 4) and g.replays == 3  # the full windows of epochs 3, 4 and 5
    assert _losses(tmp_path / "graphed") == _losses(tmp_path / "eager")
    assert _same_weights(graphed, eager)


def _raises(graph, stream, body):
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")


def _records_nothing(graph, stream, body):  # the work went to another device's streams
    import warnings
    warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted to be captured "
                  "on wrong device or stream.")


def _leaves_a_gradient_out(graph, stream, body):
    rng = torch.get_rng_state()
    body()
    torch.set_rng_state(rng)
    FakeGraph.params[0].grad = None


@pytest.mark.parametrize("refuse, reason", [
    (_raises, "CUDA error: operation not permitted when stream is capturing"),
    (_records_nothing, "The CUDA Graph is empty. This usually means that the graph was attempted to be captured "
                       "on wrong device or stream."),
    (_leaves_a_gradient_out, "1 parameter(s) got no gradient in the captured step"),
], ids=["raises", "empty-graph", "missing-gradient"])
def test_a_capture_that_fails_warns_once_and_trains_eagerly(corpus, tmp_path, fake_cuda, monkeypatch, refuse, reason):
    def record(graph, stream, body):
        fake_cuda.append(graph)
        refuse(graph, stream, body)

    monkeypatch.setattr(cg, "record", record)
    extra = ("train.optimizer=sgd", "train.lr=1.0")
    eager = _trainer(corpus, tmp_path / "eager", False, *extra)
    eager.fit()
    out = io.StringIO()
    graphed = _trainer(corpus, tmp_path / "graphed", True, *extra,
                       console=Console(file=out, width=400, color_system=None))
    graphed.fit()
    assert len(fake_cuda) == 1  # tried once
    assert graphed.graphed.graph is None and graphed.graphed.replays == 0
    assert graphed.graphed.failed == reason
    text = out.getvalue()
    assert text.count("could not be captured as a CUDA graph") == 1
    assert _losses(tmp_path / "graphed") == _losses(tmp_path / "eager")
    assert _same_weights(graphed, eager)


def test_resume_in_graph_mode_is_exact(corpus, tmp_path, fake_cuda):
    """Interrupted mid-epoch, the resumed session warms up and captures again: the same run."""
    extra = ("train.optimizer=adam", "train.lr=0.01", "train.epochs=2")
    full = _trainer(corpus, tmp_path / "full", True, *extra)
    full.fit()
    part = _trainer(corpus, tmp_path / "part", True, *extra, "train.max_steps=7")
    part.fit()
    cfg = build_config(None, ["train.max_steps=null"])
    resumed = Trainer(cfg, tmp_path / "part", resume=True, progress=False)
    resumed.fused_sgd, resumed.model.embedding.sparse = False, False
    FakeGraph.params = resumed.params
    resumed.graphed = GraphedStep(resumed.step_module, resumed.params, resumed.clip, resumed._autocast,
                                  resumed.cfg.train.bptt)
    resumed.fit()
    assert resumed.graphed.replays > 0 and resumed.step == full.step
    assert _same_weights(resumed, full)


@pytest.mark.parametrize("args, reason", [
    (("cpu", "fp32", False, False, False), "need a CUDA device"),
    (("cuda", "fp16", False, False, False), "GradScaler"),
    (("cuda", "fp32", True, False, False), "torchrun"),
    (("cuda", "bf16", False, True, False), "train.compile=true"),
    (("cuda", "fp32", False, False, True), "adaptive softmax"),
    (("cuda", "fp32", False, False, False, False), "2^25"),
    (("cuda", "bf16", False, False, False), ""),
])
def test_graph_blocker_names_what_stands_in_the_way(args, reason):
    got = graph_blocker(torch.device(args[0]), *args[1:])
    assert (reason in got) if reason else got == ""


def test_cuda_graphs_true_off_cuda_warns_and_trains(corpus, tmp_path):
    out = io.StringIO()
    cfg = build_config(None, [f"data.path={corpus}", *COMMON, "train.max_steps=4", "train.cuda_graphs=true"])
    t = Trainer(cfg, tmp_path / "r", progress=False, console=Console(file=out, width=400, color_system=None))
    assert t.graphed is None
    t.fit()
    assert "train.cuda_graphs=true is not used: CUDA graphs need a CUDA device (this run is on cpu)" in out.getvalue()
    assert t.step == 4
    cfg = build_config(None, [f"data.path={corpus}", *COMMON, "train.max_steps=4"])  # auto: silent
    out = io.StringIO()
    Trainer(cfg, tmp_path / "s", progress=False, console=Console(file=out, width=400, color_system=None)).fit()
    assert "warning" not in out.getvalue()
