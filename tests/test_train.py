"""Trainer: exact resume, schedules, divergence, torchrun/DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnlm.checkpoint import load_checkpoint
from rnnlm.config import build_config
from rnnlm.errors import RunError, UsageError
from rnnlm.train import LRSchedule, Trainer

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture()
def corpus(word_corpus) -> Path:
    return word_corpus


def _cfg(corpus: Path, *extra: str):
    return build_config(None, [f"data.path={corpus}", "data.level=word", "model.hidden_size=32",
                               "model.embedding_size=16", "model.num_layers=2", "train.batch_size=4",
                               "train.bptt=8", "train.log_every=5", "train.eval_every=10",
                               "train.eval_max_tokens=400", *extra])


def _same_last_weights(a: Path, b: Path) -> bool:
    """Bit-identical model weights in two runs' last.pt."""
    wa, wb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resume_is_exact(corpus, tmp_path, dropout, cell):
    """A run interrupted at step 20 and resumed ends exactly where the uninterrupted run ends."""
    common = (f"model.dropout={dropout}", f"model.cell={cell}", "train.optimizer=adam", "train.lr=0.01")
    full = Trainer(_cfg(corpus, "train.max_steps=40", *common), tmp_path / "full", progress=False).fit()

    Trainer(_cfg(corpus, "train.max_steps=20", *common), tmp_path / "part", progress=False).fit()
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ck["step"] == 20 and ck["trainer"]["state"] is not None  # the carried state is saved
    resumed = Trainer(build_config(None, ["train.max_steps=40"]), tmp_path / "part", resume=True,
                      progress=False).fit()
    assert resumed["step"] == full["step"] == 40
    assert resumed["best_valid_loss"] == full["best_valid_loss"]
    a = [e["loss"] for e in _events(tmp_path / "full", "eval")]
    b = [e["loss"] for e in _events(tmp_path / "part", "eval")]
    assert a == b  # every validation, before and after the interruption
    assert _same_last_weights(tmp_path / "full", tmp_path / "part")
    # metrics keep appending: one end event per session
    assert len(_events(tmp_path / "part", "end")) == 2


def test_resume_refuses_model_change(corpus, tmp_path):
    Trainer(_cfg(corpus, "train.max_steps=5"), tmp_path / "r", progress=False).fit()
    with pytest.raises(UsageError, match="cannot change model"):
        Trainer(build_config(None, ["model.hidden_size=64"]), tmp_path / "r", resume=True)


def test_existing_run_dir_refused_and_nothing_to_resume(corpus, tmp_path):
    Trainer(_cfg(corpus, "train.max_steps=5"), tmp_path / "r", progress=False).fit()
    with pytest.raises(UsageError, match="already exists"):
        Trainer(_cfg(corpus, "train.max_steps=5"), tmp_path / "r")
    with pytest.raises(UsageError, match="nothing to resume"):
        Trainer(_cfg(corpus), tmp_path / "empty", resume=True)


def test_metrics_events_and_fields(corpus, tmp_path):
    end = Trainer(_cfg(corpus, "train.max_steps=20", "train.clip_grad_norm=0.01"), tmp_path / "r",
                  progress=False).fit()
    run = tmp_path / "r"
    train = _events(run, "train")
    assert [e["step"] for e in train] == [5, 10, 15, 20]
    for e in train:
        assert {"step", "tokens", "time", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(e)
        assert e["tokens"] == e["step"] * 4 * 8
    ev = _events(run, "eval")
    assert [e["step"] for e in ev] == [10, 20] and all(math.isclose(e["ppl"], math.exp(e["loss"])) for e in ev)
    assert end["best_valid_loss"] == min(e["loss"] for e in ev)
    assert end["clipped_fraction"] == 1.0  # a tiny clip threshold clips every step
    assert end["train_tokens_per_sec"] > 0
    for name in ("config.yaml", "vocab.json", "best.pt", "last.pt", "loss.png"):
        assert (run / name).is_file(), name


def _nan_loss_from(monkeypatch, step: int) -> None:
    """From the `step`-th training step on, the model's training loss is NaN."""
    from rnnlm.models import RNNLM
    calls = {"n": 0}
    real_nll = RNNLM.nll

    def nll(self, h, y, reduction="mean"):
        out = real_nll(self, h, y, reduction)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= step:
                out = out * float("nan")
        return out
    monkeypatch.setattr(RNNLM, "nll", nll)


def test_divergence_stops_with_run_error_and_keeps_last_good(corpus, tmp_path, monkeypatch):
    """A non-finite loss stops the run (naming the step) without saving the broken weights."""
    _nan_loss_from(monkeypatch, 13)  # the 13th training step blows up
    cfg = _cfg(corpus, "train.max_steps=60", "train.log_every=5", "train.eval_every=10")
    with pytest.raises(RunError, match="step 13.*The last good checkpoint is in"):
        Trainer(cfg, tmp_path / "r", progress=False).fit()
    ck = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ck["step"] == 10  # the last good checkpoint, from the evaluation at step 10
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_a_finite_but_huge_loss_finishes_the_run_with_an_infinite_perplexity(corpus, tmp_path, capsys):
    """A diverged run whose losses stay finite (here ~1e10 nats, from weights scaled up) ends normally:
    its perplexity is inf in the end event and '>5e21' in the lines, not an OverflowError."""
    cfg = _cfg(corpus, "train.max_steps=4", "train.log_every=2", "train.eval_every=2", "train.lr=1e-12",
               "train.optimizer=sgd")
    t = Trainer(cfg, tmp_path / "r", progress=False)
    with torch.no_grad():
        t.model.decoder.weight.mul_(1e9)
    end = t.fit()
    assert end["best_valid_loss"] > 709 and end["best_valid_ppl"] == math.inf
    err = capsys.readouterr().err
    assert "ppl >5e21" in err and "best valid loss" in err
    assert _events(tmp_path / "r", "end")[0]["best_valid_ppl"] == math.inf


def test_divergence_before_the_first_save_says_there_is_no_checkpoint(corpus, tmp_path, monkeypatch):
    _nan_loss_from(monkeypatch, 3)
    cfg = _cfg(corpus, "train.max_steps=60", "train.log_every=5", "train.eval_every=10")
    with pytest.raises(RunError, match="step 3.*No checkpoint had been written yet"):
        Trainer(cfg, tmp_path / "r", progress=False).fit()
    assert not (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "best.pt").exists()


def test_stop_signal_before_the_first_validation_says_not_validated(corpus, tmp_path, monkeypatch, capsys):
    """SIGTERM before any validation: last.pt and best.pt hold the final weights, and the summary
    says they were not validated (not that there is no validation split)."""
    import os
    import signal
    from rnnlm.models import RNNLM
    real_nll, calls = RNNLM.nll, {"n": 0}

    def nll(self, h, y, reduction="mean"):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_nll(self, h, y, reduction)
    monkeypatch.setattr(RNNLM, "nll", nll)
    end = Trainer(_cfg(corpus, "train.max_steps=60", "train.eval_every=50"), tmp_path / "r", progress=False).fit()
    err = " ".join(capsys.readouterr().err.split())
    assert end["stop_reason"] == "SIGTERM" and end["best_valid_loss"] is None and end["step"] == 2
    assert "not validated (best.pt holds the last weights)" in err and "no validation split" not in err
    assert load_checkpoint(tmp_path / "r" / "best.pt")["step"] == 2


def test_an_ignored_sigint_stays_ignored(corpus, tmp_path):
    """Started with SIGINT ignored (`rnnlm train &` in a script: the shell's Ctrl-C is not for it), the
    trainer does not take SIGINT over, and gives every handler back when it ends."""
    import signal
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen = {}

        class Probe(Trainer):
            def _should_stop(self, at_log=True):  # asked at every step, inside the loop
                seen["int"], seen["term"] = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
                return super()._should_stop(at_log)
        term = signal.getsignal(signal.SIGTERM)
        Probe(_cfg(corpus, "train.max_steps=2"), tmp_path / "r", progress=False).fit()
        assert seen["int"] is signal.SIG_IGN and callable(seen["term"]) and seen["term"] is not term
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, before)


def test_lr_schedules():
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=step", "train.lr_decay=0.5",
                              "train.lr_decay_start=2"])
    s = LRSchedule(cfg.train, 100)
    assert [s.on_epoch_end(e) for e in (1, 2, 3)] == [1.0, 0.5, 0.25]
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=plateau", "train.lr_decay=4"])
    s = LRSchedule(cfg.train, 100)
    assert s.on_eval(True) == 1.0 and s.on_eval(False) == 0.25
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=cosine", "train.warmup_steps=10"])
    s = LRSchedule(cfg.train, 110)
    assert math.isclose(s.on_step(0), 0.1) and math.isclose(s.on_step(9), 1.0)
    assert math.isclose(s.on_step(60), 0.5) and s.on_step(110) == pytest.approx(0.0, abs=1e-12)


def test_lr_schedules_stop_at_min_lr():
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=plateau", "train.lr_decay=4", "train.min_lr=0.05"])
    s = LRSchedule(cfg.train, 100)
    assert [s.on_eval(False) for _ in range(4)] == [0.25, 0.0625, 0.05, 0.05]   # floored, then held
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=step", "train.lr_decay=0.5",
                              "train.lr_decay_start=0", "train.min_lr=0.2"])
    s = LRSchedule(cfg.train, 100)
    assert [s.on_epoch_end(e) for e in (1, 2, 3, 4)] == [0.5, 0.25, 0.2, 0.2]
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=cosine", "train.min_lr=0.1"])
    s = LRSchedule(cfg.train, 100)
    assert s.on_step(0) == 1.0 and math.isclose(s.on_step(50), 0.55) and math.isclose(s.on_step(100), 0.1)
    assert min(s.on_step(k) for k in range(101)) == pytest.approx(0.1)
    for bad in ("train.min_lr=1.0", "train.min_lr=3"):   # a floor at or above the lr is a mistake
        with pytest.raises(UsageError, match="must be below train.lr"):
            build_config(None, ["train.lr=1.0", bad])


def test_cosine_horizon_caps_the_schedule():
    cfg = build_config(None, ["train.lr=1.0", "train.lr_schedule=cosine", "train.warmup_steps=10"])
    s = LRSchedule(cfg.train, 1000)
    s.set_horizon(110)  # the time runs out at step 110: the cosine ends there, not at 1000
    assert math.isclose(s.on_step(60), 0.5) and s.on_step(110) == pytest.approx(0.0, abs=1e-12)
    s.set_horizon(5000)  # a horizon past max_steps does not stretch it
    assert math.isclose(s.on_step(505), 0.5)
    t = LRSchedule(cfg.train, None)  # no step bound at all: the horizon alone
    t.set_horizon(110)
    assert math.isclose(t.on_step(60), 0.5)
    u = LRSchedule(cfg.train, 1000)
    u.load_state_dict(s.state_dict())  # the horizon is part of the resumable state
    assert u.horizon == 5000 and u.total_steps() == 1000


def test_max_time_anneals_cosine_to_zero(corpus, tmp_path, monkeypatch, capsys):
    """With max_time and a cosine schedule the lr reaches ~0 when the time runs out. A fake clock
    advances 10 ms per step, so 2.0 s of training is 200 steps and the projection is exact."""
    clock = {"t": 0.0}
    monkeypatch.setattr(Trainer, "_session_time", lambda self: clock["t"])
    orig = Trainer._should_stop

    def tick(self, at_log=True):
        clock["t"] = 0.01 * (self.step - self._step0)
        return orig(self, at_log)

    monkeypatch.setattr(Trainer, "_should_stop", tick)
    end = Trainer(_cfg(corpus, "train.max_steps=null", "train.epochs=100", "train.max_time=2.0",
                       "train.lr_schedule=cosine", "train.warmup_steps=5", "train.lr=0.01",
                       "train.log_every=10", "train.eval_every=null"), tmp_path / "r", progress=False).fit()
    assert end["stop_reason"] == "max_time" and end["step"] == 200
    lrs = [e["lr"] for e in _events(tmp_path / "r", "train")]
    assert lrs[0] == pytest.approx(0.01)         # step 10: no projection yet, the cosine over 100 epochs
    assert lrs[-2] < 0.01 * 0.01 and lrs[-1] < 1e-6  # annealed by the end, not held at the base lr
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone once the horizon is known
    # Without max_time the same schedule over 100 epochs would still be at ~lr at step 200.
    assert load_checkpoint(tmp_path / "r" / "last.pt")["trainer"]["schedule"]["horizon"] == 200
    # The progress lines count to the projected last step, not to 100 epochs' worth.
    assert "step 200/200 " in capsys.readouterr().err


def test_eval_every_zero_validates_once_at_the_end(corpus, tmp_path):
    """eval_every=0: no validation at epoch ends or in between, one when training ends; with
    eval_every=null the same run validates at every epoch end."""
    common = ("train.max_steps=null", "train.epochs=3", "train.eval_max_tokens=100")
    Trainer(_cfg(corpus, *common, "train.eval_every=0"), tmp_path / "once", progress=False).fit()
    Trainer(_cfg(corpus, *common, "train.eval_every=null"), tmp_path / "epochs", progress=False).fit()
    once, epochs = _events(tmp_path / "once", "eval"), _events(tmp_path / "epochs", "eval")
    assert len(epochs) == 3 and len(once) == 1
    assert once[0]["step"] == epochs[-1]["step"] and once[0]["loss"] == epochs[-1]["loss"]  # same training
    assert (tmp_path / "once" / "best.pt").is_file() and (tmp_path / "once" / "last.pt").is_file()


def test_early_stopping(corpus, tmp_path):
    # lr so small nothing improves after the first evaluation... use lr=0 surrogate: tiny lr
    end = Trainer(_cfg(corpus, "train.max_steps=200", "train.optimizer=sgd", "train.lr=1e-12",
                       "train.early_stopping_patience=2", "train.eval_every=5"), tmp_path / "r",
                  progress=False).fit()
    assert end["stop_reason"] == "early_stopping" and end["step"] < 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_processes_match_single_process(corpus, tmp_path):
    """DDP over gloo with 2 ranks follows the single-process loss curve (same global batch, the same
    variable windows, AR/TAR penalties); so does one process with RNNLM_FORCE_DDP=1, which still runs
    the process-group path (DDP, all-reduces)."""
    args = [f"--data={corpus}", "data.level=word", "model.hidden_size=32", "model.embedding_size=16",
            "train.batch_size=4", "train.bptt=8", "train.max_steps=12", "train.log_every=1", "train.eval_every=6",
            "train.optimizer=sgd", "train.lr=0.5", "model.dropout=0.0",
            "train.state_resets=true",  # global column step % 4 restarts, whichever rank holds it
            "train.variable_bptt=true", "train.ar=1", "train.tar=1"]  # every rank cuts the same windows
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RNNLM_FORCE_DDP": "1"}
    single = subprocess.run([sys.executable, "-m", "rnnlm", "train", "--out", str(tmp_path / "s"), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert "(gloo)" not in single.stdout + single.stderr  # not under torchrun: no process group
    a, va = _events(tmp_path / "s", "train"), _events(tmp_path / "s", "eval")
    for n in (2, 1):
        ddp = _torchrun(tmp_path, f"d{n}", args, n, RNNLM_FORCE_DDP="1",
                        **({"RNNLM_DIST_TIMEOUT": "900"} if n == 2 else {}))
        assert ddp.returncode == 0, ddp.stderr[-3000:]
        said = " ".join((ddp.stdout + ddp.stderr).split())  # rich may wrap the start-up line
        assert f"{n} process{'es' if n > 1 else ''} (gloo)" in said
        b = _events(tmp_path / f"d{n}", "train")
        assert len(a) == len(b) == 12
        for x, y in zip(a, b):
            assert abs(x["loss"] - y["loss"]) < 1e-4 and x["tokens"] == y["tokens"]
        vb = _events(tmp_path / f"d{n}", "eval")
        assert [e["loss"] for e in va] == pytest.approx([e["loss"] for e in vb], abs=1e-4)
        # rank 0 alone writes: one metrics file with one end event, one "run directory" line
        assert len(_events(tmp_path / f"d{n}", "end")) == 1
        assert ddp.stdout.count("run directory:") == 1


def test_process_group_timeout_from_the_environment(monkeypatch):
    import datetime

    from rnnlm import distributed as D
    seen = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: seen.append(kw))
    two = D.DistInfo(rank=0, world_size=2)
    monkeypatch.delenv("RNNLM_DIST_TIMEOUT", raising=False)
    D.init(two, "cpu")
    monkeypatch.setenv("RNNLM_DIST_TIMEOUT", "3600")
    D.init(two, "cpu")
    assert seen == [{"backend": "gloo"}, {"backend": "gloo", "timeout": datetime.timedelta(hours=1)}]
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("RNNLM_DIST_TIMEOUT", bad)
        with pytest.raises(UsageError, match="RNNLM_DIST_TIMEOUT"):
            D.init(two, "cpu")
    D.init(D.DistInfo(), "cpu")                       # one plain process: no process group, no check
    assert len(seen) == 2


def test_tensorboard_event_files(corpus, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    Trainer(_cfg(corpus, "train.max_steps=10", "train.tensorboard=true"), tmp_path / "r", progress=False).fit()
    files = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0


def test_torchrun_resume_continues_the_single_process_curve(corpus, tmp_path):
    """A 2-rank run stopped at step 6 and resumed under torchrun ends where one process ends."""
    args = [f"--data={corpus}", "data.level=word", "model.hidden_size=32", "model.embedding_size=16",
            "train.batch_size=4", "train.bptt=8", "train.log_every=1", "train.eval_every=6",
            "train.optimizer=sgd", "train.lr=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                            "-m", "rnnlm", "train", "--out", str(tmp_path / "d"), *extra],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "rnnlm", "train", "--out", str(tmp_path / "s"), *args,
                             "train.max_steps=12"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun(*args, "train.max_steps=6")
    torchrun("--resume", "train.max_steps=12")
    a, b = _events(tmp_path / "s", "train"), _events(tmp_path / "d", "train")
    assert [e["step"] for e in b] == list(range(1, 13))
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(a, b))
    va, vb = _events(tmp_path / "s", "eval"), _events(tmp_path / "d", "eval")
    assert [e["loss"] for e in va] == pytest.approx([e["loss"] for e in vb], abs=1e-4)


def test_torchrun_timed_cosine_run_agrees_and_anneals(corpus, tmp_path):
    """Under torchrun a max_time run takes rank 0's projected horizon on every rank (one broadcast per
    log line, no hang), stops by max_time and has annealed its cosine by then."""
    args = [f"--data={corpus}", "data.level=word", "model.hidden_size=32", "model.embedding_size=16",
            "train.batch_size=4", "train.bptt=8", "train.log_every=5", "train.eval_every=0",
            "train.max_steps=null", "train.epochs=1000", "train.max_time=4", "train.lr_schedule=cosine",
            "train.lr=0.01", "train.optimizer=adam"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                        "-m", "rnnlm", "train", "--out", str(tmp_path / "d"), *args],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    end = _events(tmp_path / "d", "end")[0]
    assert end["stop_reason"] == "max_time"
    lrs = [e["lr"] for e in _events(tmp_path / "d", "train")]
    assert len(lrs) > 10 and lrs[-1] < 0.25 * 0.01   # annealed, not held near the base lr
    evals = _events(tmp_path / "d", "eval")
    assert len(evals) == 1  # eval_every=0: one validation, at the end
    assert 0 < evals[0]["seconds"] < evals[0]["time"]  # what it took, within the run's time


# -- clip + plain SGD in one pass, sparse embedding rows -----------------------------------------

@pytest.mark.parametrize("max_norm", [1e-3, 1e6, math.inf])
def test_clipped_sgd_step_equals_clip_grad_norm_then_sgd(max_norm):
    from rnnlm.train import clipped_sgd_step
    g = torch.Generator().manual_seed(0)
    emb_a = torch.nn.Embedding(50, 6, sparse=True)
    emb_b = torch.nn.Embedding(50, 6, sparse=False)
    lin_a, lin_b = torch.nn.Linear(6, 7), torch.nn.Linear(6, 7)
    with torch.no_grad():
        emb_b.weight.copy_(emb_a.weight)
        lin_b.load_state_dict(lin_a.state_dict())
    ids = torch.randint(50, (30,), generator=g)          # repeated rows: the sparse grad must be coalesced
    target = torch.randn(30, 7, generator=g)
    for emb, lin in ((emb_a, lin_a), (emb_b, lin_b)):
        ((lin(emb(ids)) - target) ** 2).sum().backward()
    pa = list(emb_a.parameters()) + list(lin_a.parameters())
    pb = list(emb_b.parameters()) + list(lin_b.parameters())
    assert emb_a.weight.grad.is_sparse
    norm_a = clipped_sgd_step(pa, 0.1, max_norm)
    norm_b = torch.nn.utils.clip_grad_norm_(pb, max_norm)
    torch.optim.SGD(pb, lr=0.1).step()
    assert torch.allclose(norm_a, norm_b, rtol=1e-6)
    for a, b in zip(pa, pb):
        assert torch.allclose(a, b, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(emb_a.weight[untouched], emb_b.weight[untouched])


def test_clipped_sgd_step_propagates_a_nan_gradient():
    from rnnlm.train import clipped_sgd_step
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    clipped_sgd_step([p], 0.1, 0.25)
    assert torch.isnan(p).all()           # as clip_grad_norm_ + SGD: the trainer then reports divergence


@pytest.mark.parametrize("extra", [(), ("model.tie_weights=true",), ("model.dropout=0.2", "model.bidirectional=true")])
def test_fused_sgd_training_equals_the_optimizer_path(corpus, tmp_path, monkeypatch, extra):
    """Training with clip + SGD fused (and sparse embedding gradients) gives the weights that
    clip_grad_norm_ + torch.optim.SGD give."""
    import rnnlm.train as train_mod
    args = ("train.max_steps=25", "train.optimizer=sgd", "train.lr=2", "train.clip_grad_norm=0.5", *extra)
    fused = Trainer(_cfg(corpus, *args), tmp_path / "fused", progress=False)
    assert fused.fused_sgd and fused.model.embedding.sparse == ("model.tie_weights=true" not in extra)
    fused.fit()
    monkeypatch.setattr(train_mod, "plain_sgd", lambda opt: False)
    plain = Trainer(_cfg(corpus, *args), tmp_path / "plain", progress=False)
    assert not plain.fused_sgd and not plain.model.embedding.sparse
    plain.fit()
    for (name, a), b in zip(fused.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    la = [e["grad_norm"] for e in _events(tmp_path / "fused", "train")]
    lb = [e["grad_norm"] for e in _events(tmp_path / "plain", "train")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_adaptive_softmax_trains_under_bf16_autocast(corpus, tmp_path):
    """nn.AdaptiveLogSoftmaxWithLoss's own forward fails under CPU bf16 autocast; ours trains."""
    end = Trainer(_cfg(corpus, "train.max_steps=12", "model.softmax=adaptive", "model.adaptive_cutoffs=[4,9]",
                       "train.precision=bf16"), tmp_path / "r", progress=False).fit()
    assert end["step"] == 12 and math.isfinite(end["best_valid_loss"])
    losses = [e["loss"] for e in _events(tmp_path / "r", "train")]
    assert losses[-1] < losses[0]


def test_precision_auto_resolves_by_hardware(monkeypatch):
    import rnnlm.train as train_mod
    from rnnlm.train import cpu_has_native_bf16, resolve_precision
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    old = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    assert cpu_has_native_bf16(zen4) and not cpu_has_native_bf16(old) and not cpu_has_native_bf16("")
    assert cpu_has_native_bf16("flags : sse2 amx_bf16 amx_tile\n")
    cpu = torch.device("cpu")
    for given in ("fp32", "bf16", "fp16"):
        assert resolve_precision(given, cpu) == given
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"


def test_precision_auto_trains_with_what_it_resolved_to(corpus, tmp_path, monkeypatch):
    import rnnlm.train as train_mod
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    t = Trainer(_cfg(corpus, "train.max_steps=3", "train.precision=auto"), tmp_path / "r", progress=False)
    assert t.precision == "bf16" and t.amp_dtype == torch.bfloat16
    t.fit()
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["train"]["precision"] == "auto"


def _check_exact_resume(corpus: Path, tmp_path: Path, *common: str) -> Trainer:
    """40 steps straight, against 20 steps then a resume to 40: the same validations and the same
    final weights, bit for bit. Returns the uninterrupted run's trainer."""
    full = Trainer(_cfg(corpus, "train.max_steps=40", *common), tmp_path / "full", progress=False)
    end = full.fit()
    Trainer(_cfg(corpus, "train.max_steps=20", *common), tmp_path / "part", progress=False).fit()
    resumed = Trainer(build_config(None, ["train.max_steps=40"]), tmp_path / "part", resume=True,
                      progress=False).fit()
    assert resumed["best_valid_loss"] == end["best_valid_loss"]
    assert [e["loss"] for e in _events(tmp_path / "full", "eval")] == \
        [e["loss"] for e in _events(tmp_path / "part", "eval")]
    assert _same_last_weights(tmp_path / "full", tmp_path / "part")
    return full


def test_resume_is_exact_with_fused_sgd_and_layerwise_dropout(corpus, tmp_path):
    """The plain-SGD path (fused clip + update, sparse embedding rows) and the layer-by-layer
    dropout resume exactly too."""
    full = _check_exact_resume(corpus, tmp_path, "model.dropout=0.3", "train.optimizer=sgd", "train.lr=2",
                               "train.clip_grad_norm=0.5")
    assert full.fused_sgd and full.model.embedding.sparse


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_adam_is_fused_on_cpu_and_matches_the_loop(opt):
    """build_optimizer picks the fused Adam/AdamW kernel on CPU; ten steps of it land where
    torch's per-tensor loop lands (same math, rounding aside)."""
    from rnnlm.train import build_optimizer
    cfg = build_config(None, [f"train.optimizer={opt}", "train.lr=0.01", "train.weight_decay=0.1",
                              "train.beta2=0.99"])
    torch.manual_seed(0)
    a = torch.nn.LSTM(6, 8, 2)
    b = torch.nn.LSTM(6, 8, 2)
    b.load_state_dict(a.state_dict())
    w0 = a.weight_ih_l0.detach().clone()
    fused = build_optimizer(a, cfg.train)
    assert fused.param_groups[0]["fused"] is True
    cls = torch.optim.Adam if opt == "adam" else torch.optim.AdamW
    loop = cls(b.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    x = torch.randn(5, 3, 6)
    for _ in range(10):
        for m, o in ((a, fused), (b, loop)):
            o.zero_grad()
            m(x)[0].pow(2).sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert (a.weight_ih_l0 - w0).abs().max() > 1e-3  # the weights did move


def test_resume_keeps_this_machines_optimizer_implementation(corpus, tmp_path):
    """A checkpoint written by a per-tensor Adam (an older rnnlm, or a device without the fused
    kernel) resumes with the fused kernel chosen here, and vice versa the flags never travel."""
    from rnnlm.checkpoint import save_checkpoint
    Trainer(_cfg(corpus, "train.max_steps=5", "train.optimizer=adam"), tmp_path / "r", progress=False).fit()
    ck = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ck["trainer"]["optimizer"]["param_groups"][0]["fused"] is True
    ck["trainer"]["optimizer"]["param_groups"][0]["fused"] = None   # as an unfused optimizer saves it
    save_checkpoint(tmp_path / "r" / "last.pt", ck)
    t = Trainer(build_config(None, ["train.max_steps=8"]), tmp_path / "r", resume=True, progress=False)
    assert t.optimizer.param_groups[0]["fused"] is True
    assert t.optimizer.param_groups[0]["lr"] == ck["trainer"]["optimizer"]["param_groups"][0]["lr"]
    assert t.fit()["step"] == 8


def test_resume_without_max_time_drops_the_projected_horizon(corpus, tmp_path):
    """A timed run resumed with max_time=null follows max_steps again, not the old projection."""
    Trainer(_cfg(corpus, "train.max_steps=20", "train.max_time=1000", "train.lr_schedule=cosine",
                 "train.log_every=5"), tmp_path / "r", progress=False).fit()
    assert load_checkpoint(tmp_path / "r" / "last.pt")["trainer"]["schedule"]["horizon"] is not None
    t = Trainer(build_config(None, ["train.max_time=null", "train.max_steps=30"]), tmp_path / "r", resume=True,
                progress=False)
    assert t.schedule.horizon is None and t.schedule.total_steps() == 30
    kept = Trainer(build_config(None, ["train.max_steps=30"]), tmp_path / "r", resume=True, progress=False)
    assert kept.schedule.horizon is not None  # still timed: the saved projection until the next log line


@pytest.mark.parametrize("cell", ["lstm", "lstm_peephole"])
def test_compiled_training_matches_eager(corpus, tmp_path, cell, monkeypatch):
    """train.compile=true (torch.compile over the loss module) follows the eager loss curve; the
    direct oneDNN calls step aside while the compiler traces (it cannot lower them)."""
    common = (f"model.cell={cell}", "model.dropout=0.0", "train.optimizer=sgd", "train.lr=1.0", "train.max_steps=20",
              "train.bptt=10")
    Trainer(_cfg(corpus, *common), tmp_path / "eager", progress=False).fit()
    import rnnlm.ops as ops
    monkeypatch.setattr(ops, "_INPLACE_SOFTMAX", {})  # as in a fresh process: no check has run yet
    monkeypatch.setattr(ops, "_ONEDNN_F32", None)
    monkeypatch.setattr(ops, "_ONEDNN_PACKED", None)
    Trainer(_cfg(corpus, *common, "train.compile=true"), tmp_path / "compiled", progress=False).fit()
    a, b = _events(tmp_path / "eager", "train"), _events(tmp_path / "compiled", "train")
    assert len(a) == len(b) == 4
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], abs=1e-4)


def test_step_stats_fold_in_chunks_and_find_the_first_bad_step():
    """The per-step loss/grad-norm buffer gives the same sums, clip count and first non-finite step
    whether it folds once per log line or every few steps."""
    from rnnlm.train import _StepStats
    losses = [2.0, 1.5, 1.25, 1.0, float("nan"), 0.5, float("inf")]
    gnorms = [0.1, 0.5, 0.2, 0.9, 0.3, 0.7, 0.0]
    for chunk in (1, 3, 256):
        st = _StepStats(torch.device("cpu"), clip=0.4, chunk=chunk)
        for i in range(3):
            st.add(11 + i, torch.tensor(losses[i]), torch.tensor(gnorms[i]))
        loss_sum, gnorm_sum, clipped, first = st.take()
        assert loss_sum.item() == 4.75 and gnorm_sum.item() == pytest.approx(0.8) and clipped.item() == 1
        assert first.item() == -1 and st.first_bad().item() == -1
        for i in range(3, 7):
            st.add(11 + i, torch.tensor(losses[i]), torch.tensor(gnorms[i]))
        assert st.first_bad().item() == 15  # the NaN at the 5th step, numbered 15
        _, gnorm_sum, clipped, first = st.take()
        assert first.item() == 15 and clipped.item() == 2 and gnorm_sum.item() == pytest.approx(1.9)
        assert st.take()[3].item() == -1  # taken: the next interval starts clean


def _first_step_worker(rank: int, world: int, store_path: str, values: list, out_path: str) -> None:
    import torch.distributed as dist
    from rnnlm import distributed as D
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        t = torch.tensor(values[rank], dtype=torch.long)
        D.all_reduce_first_step(t, D.DistInfo(rank=rank, world_size=world))
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(str(t.item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("values,expected", [([-1, 7, 5], 5), ([9, -1, -1], 9), ([-1, -1, -1], -1)])
def test_all_ranks_report_the_earliest_non_finite_step(tmp_path, values, expected):
    """Each rank's first non-finite step (-1: none) reduces to the earliest over the ranks, on every rank."""
    import torch.multiprocessing as mp
    out = tmp_path / "got"
    mp.spawn(_first_step_worker, args=(3, str(tmp_path / "store"), values, str(out)), nprocs=3)
    assert [int((tmp_path / f"got.{r}").read_text()) for r in range(3)] == [expected] * 3


def test_library_use_without_a_console_logs_plain_text(corpus, tmp_path, capsys):
    """Trainer used from Python without a rich console writes its log lines without markup."""
    Trainer(_cfg(corpus, "train.max_steps=5", "train.eval_every=5"), tmp_path / "r", progress=False).fit()
    err = capsys.readouterr().err
    assert "rnnlm training lstm 2x32" in err and "done: 5 steps" in err
    assert "[bold]" not in err and "[/" not in err


def _torchrun(tmp_path, out: str, args: list[str], nproc: int, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           "-m", "rnnlm", "train", "--out", str(tmp_path / out), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_one_process_under_torchrun_is_a_plain_run_even_with_dropout(corpus, tmp_path):
    """torchrun with one process trains exactly as a plain run, dropout masks included; with
    RNNLM_FORCE_DDP=1 it goes through DDP and still draws the same masks (rank 0 keeps the plain
    run's random stream)."""
    args = [f"--data={corpus}", "data.level=word", "model.hidden_size=32", "model.embedding_size=16",
            "train.batch_size=4", "train.bptt=8", "train.max_steps=8", "train.log_every=1", "train.eval_every=4",
            "train.optimizer=sgd", "train.lr=0.5", "model.dropout=0.3"]
    single = subprocess.run([sys.executable, "-m", "rnnlm", "train", "--out", str(tmp_path / "s"), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    want = [e["loss"] for e in _events(tmp_path / "s", "train")]
    plain = _torchrun(tmp_path, "t", args, 1)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "(gloo)" not in plain.stdout + plain.stderr
    assert [e["loss"] for e in _events(tmp_path / "t", "train")] == want
    forced = _torchrun(tmp_path, "f", args, 1, RNNLM_FORCE_DDP="1")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "1 process (gloo)" in " ".join((forced.stdout + forced.stderr).split())
    assert [e["loss"] for e in _events(tmp_path / "f", "train")] == pytest.approx(want, abs=1e-6)


def test_adaptive_softmax_trains_under_ddp(corpus, tmp_path):
    """A window whose targets all fall in the head leaves the tail clusters without a gradient;
    DDP is told to expect that, so two processes train an adaptive softmax without error."""
    args = [f"--data={corpus}", "data.level=word", "model.hidden_size=16", "model.embedding_size=8",
            "model.softmax=adaptive", "model.adaptive_cutoffs=[8, 16]", "train.batch_size=2", "train.bptt=4",
            "train.max_steps=40", "train.log_every=10", "train.eval_every=20", "train.eval_max_tokens=200"]
    r = _torchrun(tmp_path, "a", args, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [e["loss"] for e in _events(tmp_path / "a", "train")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_a_non_finite_loss_between_log_lines_is_caught_before_a_validation_saves(corpus, tmp_path, monkeypatch):
    """Log lines every 7 steps, validations every 10: the loss turns NaN at step 19, and the
    validation at step 20 must not save those weights as last.pt; the run stops naming step 19 and
    keeps step 10's checkpoint."""
    _nan_loss_from(monkeypatch, 19)
    cfg = _cfg(corpus, "train.max_steps=60", "train.log_every=7", "train.eval_every=10")
    with pytest.raises(RunError, match="step 19"):
        Trainer(cfg, tmp_path / "r", progress=False).fit()
    ck = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ck["step"] == 10
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_char_level_on_space_separated_characters_warns(tmp_path, capsys):
    """PTB-char's format (`a e r _ b a n k`) at char level makes every other token a space: warned;
    ordinary prose is not, nor deeply indented code (its spaces come in runs)."""
    import random
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "away", "quickly"]
    prose = "".join(" ".join(rng.choice(words) for _ in range(8)) + "\n" for _ in range(300))
    spaced = "".join(" ".join("_" if c == " " else c for c in line) + "\n" for line in prose.splitlines())
    code = "".join(" " * (4 * rng.randint(2, 5)) + "x = f(y)\n" for _ in range(400))  # >40 % spaces, in runs
    assert code.count(" ") / len(code) > 0.5
    for name, text, warned in (("prose", prose, False), ("spaced", spaced, True), ("code", code, False)):
        (tmp_path / f"{name}.txt").write_text(text)
        cfg = build_config(None, [f"data.path={tmp_path / name}.txt", "data.level=char", "model.hidden_size=16",
                                  "model.embedding_size=8", "model.num_layers=1", "train.batch_size=4",
                                  "train.bptt=8", "train.max_steps=1"])
        Trainer(cfg, tmp_path / f"r_{name}", progress=False).fit()
        err = " ".join(capsys.readouterr().err.split())
        assert ("of the training characters are spaces" in err) == warned, (name, err[:300])
        assert not warned or "data.level=word" in err


@pytest.mark.parametrize("key, value, needle", [
    ("model.dropout", 1.5, "model.dropout"), ("data.split", [0.5, 0.6], "data.split"),
    ("model.hidden_size", -1, "model.hidden_size"), ("model.cell", "lstmm", "model.cell"),
    ("train.lr", "fast", "train.lr")])
def test_a_config_built_in_code_is_checked_before_training(corpus, tmp_path, key, value, needle):
    """The checks of YAML/KEY=VALUE apply to a Config assembled in Python: a UsageError naming the
    key before anything is trained or written (a bad value used to train, then fail to load)."""
    cfg = _cfg(corpus, "train.max_steps=3")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(UsageError, match=needle):
        Trainer(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_config_built_in_code_is_normalised_not_mutated(corpus, tmp_path):
    cfg = _cfg(corpus, "train.max_steps=2")
    cfg.train.lr = "0.01"                       # what YAML 1.1 leaves a string: read as the number
    tr = Trainer(cfg, tmp_path / "r", progress=False)
    assert tr.cfg.train.lr == 0.01 and cfg.train.lr == "0.01"
    tr.fit()


def test_run_without_validation_split_says_best_pt_holds_the_last_weights(word_corpus, tmp_path, capsys):
    end = Trainer(_cfg(word_corpus, "train.max_steps=3", "data.split=[1,0,0]"), tmp_path / "r",  # all of it training
                  progress=False).fit()
    err = " ".join(capsys.readouterr().err.split())
    assert end["best_valid_loss"] is None and end["step"] == 3
    assert "no validation split (best.pt holds the last weights)" in err
    assert load_checkpoint(tmp_path / "r" / "best.pt")["step"] == 3


# -- state resets (train.state_resets) ---------------------------------------------------------------

def test_reset_column_zeroes_one_column_of_a_copy():
    from rnnlm.models import reset_column
    h, c = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    h0, c0 = h.clone(), c.clone()
    nh, nc = reset_column((h, c), 3)
    for new, old in ((nh, h0), (nc, c0)):
        assert torch.all(new[:, 3] == 0)
        keep = [0, 1, 2, 4]
        assert torch.equal(new[:, keep], old[:, keep])
    assert torch.equal(h, h0) and torch.equal(c, c0)        # the caller's tensors are untouched
    g = torch.randn(1, 4, 2)
    assert torch.all(reset_column(g, 0)[:, 0] == 0) and reset_column(None, 0) is None


@pytest.mark.parametrize("eos, batch, setting, expected", [
    ("none", 16, None, True), ("none", 4, None, False),     # null: on without <eos> markers, from batch 16
    ("line", 16, None, False), ("paragraph", 64, None, False),
    ("none", 16, False, False), ("line", 4, True, True),    # explicit values win
])
def test_state_resets_default_follows_the_eos_policy_and_is_recorded(corpus, tmp_path, eos, batch, setting,
                                                                     expected):
    extra = [f"data.eos={eos}", f"train.batch_size={batch}", "train.max_steps=1"]
    extra += [f"train.state_resets={str(setting).lower()}"] if setting is not None else []
    tr = Trainer(_cfg(corpus, *extra), tmp_path / "r", progress=False)
    assert tr.state_resets is expected and tr.cfg.train.state_resets is expected
    tr.fit()   # the value in use, not null, goes into the run's config
    assert f"state_resets: {str(expected).lower()}" in (tmp_path / "r" / "config.yaml").read_text()


def test_a_run_saved_before_state_resets_resumes_without_them():
    from rnnlm.config import Config
    from rnnlm.train import _merge_resume_config
    saved = Config().to_dict()
    saved["data"]["eos"] = "none"
    saved["train"]["batch_size"] = 64
    old = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "state_resets"}}
    assert _merge_resume_config(old, build_config(None, [])).train.state_resets is False
    assert _merge_resume_config(old, build_config(None, ["train.state_resets=true"])).train.state_resets is True
    saved["train"]["state_resets"] = True
    assert _merge_resume_config(saved, build_config(None, [])).train.state_resets is True


def test_state_resets_zero_one_column_per_step_in_turn(corpus, tmp_path, monkeypatch):
    from rnnlm.models import RNNLM
    seen = []
    real = RNNLM.forward

    def forward(self, x, state=None, direction=0):
        if self.training:
            seen.append(None if state is None else [s.detach().clone() for s in state])
        return real(self, x, state, direction)
    monkeypatch.setattr(RNNLM, "forward", forward)
    Trainer(_cfg(corpus, "train.max_steps=9", "train.state_resets=true", "train.eval_every=null"), tmp_path / "r",
            progress=False).fit()
    B = 4
    assert seen[0] is None and len(seen) == 9                     # the first window starts from zero anyway
    for step, state in enumerate(seen[1:], start=1):              # the state carried into step `step` + 1
        for t in state:                                           # (h, c), each (L, B, H)
            zero = [bool(torch.all(t[:, j] == 0)) for j in range(B)]
            assert zero == [j == step % B for j in range(B)]


def test_resume_is_exact_with_state_resets(corpus, tmp_path):
    full = _check_exact_resume(corpus, tmp_path, "data.eos=none", "train.state_resets=true", "train.optimizer=adam",
                               "train.lr=0.01", "model.dropout=0.2")
    assert full.state_resets


_RANK1_EDITS = '''
import os
if os.environ.get("RANK") == "1" and os.environ.get("RNNLM_TEST_EDIT_ON_RANK1"):
    import rnnlm.train as T
    _load = T.load_corpus

    def load_corpus(*args, **kwargs):  # a file changes after rank 0 has read the folder
        with open(os.environ["RNNLM_TEST_EDIT_ON_RANK1"], "a") as f:
            f.write("x = 1\\n")
        return _load(*args, **kwargs)
    T.load_corpus = load_corpus
'''


def test_torchrun_reads_a_folder_once_and_the_ranks_check_they_agree(tmp_path):
    """data.glob under torchrun: rank 0 gathers and caches the folder's text, the other rank finds
    it in the cache (one gathered text, not one per rank); if a file changes in between, every rank
    stops with one message instead of training on different texts."""
    src = tmp_path / "proj"
    rng = random.Random(3)
    for k in range(4):
        (src / f"m{k}").mkdir(parents=True)
        (src / f"m{k}" / "code.py").write_text("".join(
            f"def f{i}(x):\n    return x * {rng.randint(0, 99)} + {rng.randint(0, 9)}\n\n" for i in range(150)))
    args = [f"--data={src}", "data.glob=**/*.py", "data.level=char", "model.hidden_size=16",
            "model.embedding_size=8", "train.batch_size=4", "train.bptt=16", "train.max_steps=4",
            "train.eval_every=2", "train.eval_max_tokens=200"]
    cache = tmp_path / "cache"
    ok = _torchrun(tmp_path, "ok", args, 2, RNNLM_CACHE=str(cache))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(list((cache / "corpora").glob("files-*.txt"))) == 1
    assert _events(tmp_path / "ok", "end")[0]["step"] == 4

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_RANK1_EDITS)
    bad = _torchrun(tmp_path, "bad", args, 2, RNNLM_CACHE=str(tmp_path / "cache2"),
                    RNNLM_TEST_EDIT_ON_RANK1=str(src / "m2" / "code.py"),
                    PYTHONPATH=os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    assert bad.returncode != 0
    said = " ".join((bad.stdout + bad.stderr).split())
    assert said.count("error: the processes read different training texts") == 2  # each rank, one line
    assert "rnnlm/" not in bad.stdout + bad.stderr  # no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "bad" / "last.pt").exists()

    # A folder rank 0 cannot use: its message from every rank, and no rank left waiting.
    none = _torchrun(tmp_path, "none", [a if not a.startswith("data.glob=") else "data.glob=**/*.rs" for a in args], 2,
                     RNNLM_CACHE=str(cache))
    assert none.returncode != 0
    said = " ".join((none.stdout + none.stderr).split())
    assert said.count("error: no files under") == 2 and "rnnlm/" not in none.stdout + none.stderr


def test_bf16_on_a_device_without_autocast_is_a_usage_error(corpus, tmp_path, monkeypatch):
    """Older PyTorch versions have no autocast for MPS: train.precision=bf16 there is one clear message
    (exit 2 from the CLI), not PyTorch's error at the first step. The check is stood in for here."""
    import rnnlm.ops as ops
    import rnnlm.train as tr
    assert ops.autocast_available("cpu") and not ops.autocast_available("meta")
    monkeypatch.setattr(tr, "autocast_available", lambda device_type: device_type != "cpu")
    with pytest.raises(UsageError, match="train.precision=fp32"):
        Trainer(_cfg(corpus, "train.precision=bf16", "train.max_steps=1"), tmp_path / "r", progress=False)
    Trainer(_cfg(corpus, "train.precision=fp32", "train.max_steps=1"), tmp_path / "r2", progress=False)
