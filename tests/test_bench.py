"""The benchmark helpers: the reference recipe with validation (scripts/ref_train.py) and the
arithmetic bench.py uses to turn metrics into ratios."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    words = "the cat sat on a mat and the dog ate my hat".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=g))
             for n in torch.randint(3, 9, (120,), generator=g)]
    (d / "train.txt").write_text("\n".join(lines[:100]) + "\n")
    (d / "valid.txt").write_text("\n".join(lines[100:]) + "\n")
    return d


SMALL = ["--emsize", "8", "--nhid", "8", "--nlayers", "1", "--batch", "4", "--bptt", "5", "--dropout", "0"]


def ref_train(corpus: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "scripts" / "ref_train.py"), str(corpus / "train.txt"),
           str(corpus / "valid.txt"), *SMALL, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


def test_ref_train_runs_its_epochs_and_validates_on_schedule(tiny_corpus):
    lines = ref_train(tiny_corpus, "--epochs", "2", "--eval-every", "4")
    evals, end = lines[:-1], lines[-1]
    tokens = sum(len(x.split()) + 1 for x in (tiny_corpus / "train.txt").read_text().splitlines())
    per_epoch = (tokens // 4 - 2) // 5
    assert end["event"] == "end" and end["reason"] == "epochs" and end["step"] == 2 * per_epoch
    assert end["tokens"] == 2 * per_epoch * 5 * 4
    want_steps = sorted({s for s in range(4, 2 * per_epoch + 1, 4)} | {per_epoch, 2 * per_epoch})
    assert [e["step"] for e in evals] == want_steps
    assert all(e["valid_ppl"] > 1 and math.isfinite(e["valid_ppl"]) for e in evals)
    assert end["best_valid_ppl"] == pytest.approx(min(e["valid_ppl"] for e in evals))


def test_ref_train_stops_at_the_target_and_at_the_time_limit(tiny_corpus):
    lines = ref_train(tiny_corpus, "--epochs", "3", "--eval-every", "2", "--target-ppl", "1e9")
    assert lines[-1]["reason"] == "target" and [e["step"] for e in lines[:-1]] == [2]
    lines = ref_train(tiny_corpus, "--epochs", "1000", "--max-time", "0.01")
    assert lines[-1]["reason"] == "max_time" and lines[-1]["step"] == 1 and len(lines) == 2


def test_ref_train_windowed_evaluation_equals_one_pass_over_the_stream():
    """State carried across windows: the windowed mean NLL is the whole stream's in one call."""
    mod = load_script("ref_train")
    a = Namespace(dropout=0.0, emsize=6, nhid=5, nlayers=2, bptt=7)
    torch.manual_seed(3)
    m = mod.LM(11, a)
    data = mod.columns(torch.randint(11, (203,)), 3)                   # (67, 3)
    got = mod.evaluate(m, data, a, bf16=False)
    with torch.no_grad():
        out, _ = m(data[:-1], None)
        want = torch.nn.functional.cross_entropy(out, data[1:].reshape(-1)).item()
    assert got == pytest.approx(want, rel=1e-6)
    assert m.training                                                  # left in training mode


def test_bench_arithmetic():
    bench = load_script("bench")
    events = [{"event": "train", "tokens": 100, "tokens_per_sec": 1.0},      # warm-up interval, skipped
              {"event": "eval", "split": "valid", "ppl": 130.0, "time": 5.0},
              {"event": "train", "tokens": 400, "tokens_per_sec": 100.0},    # 300 tokens in 3 s
              {"event": "eval", "split": "valid", "ppl": 119.0, "time": 9.0},
              {"event": "train", "tokens": 500, "tokens_per_sec": 100.0},    # 100 tokens in 1 s
              {"event": "eval", "split": "valid", "ppl": 110.0, "time": 12.0}]
    assert bench.steady_tokens_per_sec(events) == pytest.approx(400 / 4)
    assert bench.first_valid_at_most(events, 120)["time"] == 9.0
    assert bench.first_valid_at_most(events, 100) is None


def test_host_speed_probe_reports_both_products():
    speed = load_script("bench").host_speed(reps=2)
    assert set(speed) == {"host_bf16_gflops", "host_fp32_gflops"}
    assert all(1 < v < 1e5 for v in speed.values())   # GFLOP/s of a real product on a real CPU


def test_ratio_summary_takes_median_and_range():
    bench = load_script("bench")
    reps = [{"ratio_fp32": 1.1, "ratio_bf16": 2.9}, {"ratio_fp32": 1.2, "ratio_bf16": 2.4},
            {"ratio_fp32": 1.0, "ratio_bf16": 2.7}]
    s = bench.ratio_summary(reps)
    assert s["ratio_fp32_median"] == 1.1 and s["ratio_bf16_median"] == 2.7
    assert (s["ratio_bf16_min"], s["ratio_bf16_max"]) == (2.4, 2.9)
    assert (s["ratio_fp32_min"], s["ratio_fp32_max"]) == (1.0, 1.2)


def _fake_ptb(tmp_path) -> None:
    ptb = tmp_path / "data" / "ptb"
    ptb.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(50)]
    for split, n in (("train", 3000), ("valid", 200), ("test", 200)):
        ids = torch.randint(len(words), (n, 8), generator=g).tolist()
        (ptb / f"{split}.txt").write_text("".join(" ".join(words[i] for i in row) + "\n" for row in ids))


def test_bench_gpu_dry_runs_on_the_cpu(tmp_path):
    """scripts/bench_gpu.py end to end with the CPU in the GPU's place (--device cpu): the
    reference and rnnlm runs, the ratios and results.json, and the profile (CUDA itself is
    covered by tests/test_cuda.py on a GPU)."""
    _fake_ptb(tmp_path)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "throughput", "profile", "--device", "cpu",
           "--seconds", "2", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    # one thread each: on a busy machine two spinning OpenMP threads per process can slow a step a
    # hundredfold, and the dry run would time too few steps
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RNNLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rnnlm fp32" in r.stdout and "x reference fp32" in r.stdout and "kernel launches per step" in r.stdout
    results = json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())
    tp = results["throughput"]
    assert all(tp[k] > 0 for k in ("ref_fp32", "ref_fp32_again", "rnnlm_fp32", "rnnlm_bf16"))
    assert tp["ratio_fp32"] == pytest.approx(tp["rnnlm_fp32"] / ((tp["ref_fp32"] + tp["ref_fp32_again"]) / 2))
    assert "rnnlm_fp16" not in tp  # fp16 is CUDA's


def test_bench_gpu_eval_and_memory_checks_dry_run(tmp_path):
    """bench_gpu.py eval-tf32 and graph-memory with the CPU in the GPU's place: every batched
    evaluation gives the batch-1 perplexity, whatever tolerance the check used."""
    _fake_ptb(tmp_path)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "eval-tf32", "graph-memory", "--device", "cpu",
           "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RNNLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())
    rows = results["eval-tf32"]["rows"]
    assert [(x["tf32"], x["check"]) for x in rows] == [
        (tf32, check) for tf32 in (True, False) for check in ("fp32's 1e-4", "state_tolerance", "batch 1")]
    one = rows[2]["ppl"]
    assert 1 < one < 50 and all(x["ppl"] == pytest.approx(one, rel=1e-6) for x in rows)
    assert set(results["graph-memory"]) == {"cuda_graphs=false", "cuda_graphs=true"}


def test_tune_eval_chooses_on_validation_and_tests_once(tiny_corpus, tmp_path, capsys, monkeypatch):
    from rnnlm.config import build_config
    from rnnlm.evaluate import perplexity
    from rnnlm.cache import CacheSpec
    from rnnlm.checkpoint import load_model
    from rnnlm.dynamic import DynamicSpec
    from rnnlm.train import Trainer
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    cfg = build_config(None, [f"data.path={tiny_corpus}", "data.level=word", "model.hidden_size=16",
                              "model.embedding_size=8", "model.num_layers=1", "train.batch_size=4",
                              "train.bptt=8", "train.max_steps=40", "train.eval_every=null", "train.device=cpu"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    valid, test = tiny_corpus / "valid.txt", tiny_corpus / "train.txt"
    tune = load_script("tune_eval")
    out = tmp_path / "tune.json"
    assert tune.main(["-m", str(tmp_path / "run"), "--valid", str(valid), "--test", str(test), "--sizes", "20,60",
                      "--thetas", "0.5,2", "--lambdas", "0.1,0.3", "--dynamic-lrs", "0.1,0.5",
                      "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    best_cache = min((e for r in res["cache_per_size"] for e in r["grid"]), key=lambda e: e["loss"])
    assert res["chosen"]["cache"] == best_cache                         # the lowest validation loss of all
    assert res["chosen"]["dynamic"] == min(res["dynamic_grid"], key=lambda e: e["loss"])
    lm = load_model(tmp_path / "run", "cpu")                            # the test number, recomputed
    c = res["chosen"]["cache"]
    want = perplexity(lm.model, lm.vocab, lm.tokenizer, test, 16,
                      cache=CacheSpec(c["size"], (c["theta"],), (c["lambda"],)))
    assert res["test_plain_ppl"] == want["ppl"] and res["test_cache_ppl"] == want["cache"][0]["ppl"]
    assert "test_dynamic_ppl" in res and "test_dynamic_cache_ppl" in res
    assert "chosen on validation" in capsys.readouterr().out
    # the RMS rule, with a list of decays: every (lr, decay) pair on validation, the best one on test;
    # its statistics measured once (one direction), for validation and test alike
    import rnnlm.evaluate as ev
    measured: list[int] = []
    real_rms = ev.gradient_rms
    monkeypatch.setattr(ev, "gradient_rms", lambda *a, **kw: measured.append(1) or real_rms(*a, **kw))
    assert tune.main(["-m", str(tmp_path / "run"), "--valid", str(valid), "--test", str(test), "--no-cache",
                      "--dynamic-lrs", "1e-4,1e-3", "--dynamic-decay", "0,0.1", "--dynamic-rms-eps", "0.5", "--dynamic-rms-data",
                      str(tiny_corpus / "train.txt"), "--json", str(out)]) == 0
    assert len(measured) == 1
    res = json.loads(out.read_text())
    assert [(e["lr"], e["decay"], e["rule"], e["eps"]) for e in res["dynamic_grid"]] == [
        (1e-4, 0.0, "rms", 0.5), (1e-4, 0.1, "rms", 0.5), (1e-3, 0.0, "rms", 0.5), (1e-3, 0.1, "rms", 0.5)]
    d = res["chosen"]["dynamic"]
    assert d == min(res["dynamic_grid"], key=lambda e: e["loss"])
    want = perplexity(lm.model, lm.vocab, lm.tokenizer, test, 16, dynamic=DynamicSpec(
        (d["lr"],), d["decay"], d["segment"], tiny_corpus / "train.txt", d["eps"]))
    assert res["test_dynamic_ppl"] == want["dynamic"][0]["ppl"]
    assert tune.main(["-m", str(tmp_path / "run"), "--valid", str(valid), "--test", str(test), "--no-cache"]) == 2
    for bad in (["--dynamic-lrs", "1e-4", "--dynamic-rms-eps", "0.1"],                   # ε without the RMS rule
                ["--dynamic-rms-data", str(tiny_corpus / "train.txt")],               # the rule without lrs
                ["--dynamic-lrs", "1e-4", "--dynamic-rms-data", str(tmp_path / "nope.txt")]):
        assert tune.main(["-m", str(tmp_path / "run"), "--valid", str(valid), "--test", str(test), *bad]) == 2
    assert tune.main(["-m", str(tmp_path / "run"), "--valid", str(valid), "--test", str(test), "--sizes", "1.5"]) == 2


def test_tune_eval_never_chooses_a_diverged_setting():
    from rnnlm.errors import UsageError
    tune = load_script("tune_eval")
    nan, inf = math.nan, math.inf
    for grid in ([{"loss": nan}, {"loss": 2.0}, {"loss": 1.5}], [{"loss": 1.5}, {"loss": inf}, {"loss": nan}]):
        assert tune._best(grid) == {"loss": 1.5}
    with pytest.raises(UsageError, match="diverged"):
        tune._best([{"loss": nan}, {"loss": inf}])
