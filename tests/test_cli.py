"""The `rnnlm` command end to end, through the installed command, on small corpora written here.

Training and the main paths run as real processes (`python -m rnnlm` and the `rnnlm` console
script). The long list of bad inputs runs in-process through Typer's CliRunner (same code, no
interpreter start-up per case); a sample of them also runs as a real process.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from rnnlm import __version__
from rnnlm.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint
from rnnlm.cli import app
from rnnlm.config import build_config
from rnnlm.errors import UsageError

TINY = ["model.hidden_size=32", "model.embedding_size=16", "model.num_layers=1", "train.batch_size=4",
        "train.bptt=16", "train.max_steps=30", "train.eval_every=10", "train.log_every=5", "train.device=cpu"]
COMMANDS = ["train", "sample", "eval-perplexity", "score", "plot"]
WORDS = ("the cat dog sat ran on under a mat rug big small red old house tree and saw quickly slowly").split()


# -- helpers ----------------------------------------------------------------------------------

def word_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        subj, verb, obj = rng.choice(WORDS[:3]), rng.choice(WORDS[3:5]), rng.choice(WORDS[9:13])
        lines.append(f"the {subj} {verb} on the {rng.choice(['big', 'small', 'red'])} {obj}")
    return "\n".join(lines) + "\n"


def char_text(n_par: int, seed: int) -> str:
    rng = random.Random(seed)
    pars = []
    for _ in range(n_par):
        pars.append("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
                              for _ in range(rng.randint(1, 3))))
    return "\n\n".join(pars) + "\n"


def env_for(cache: Path) -> dict:
    env = dict(os.environ)
    # one intra-op thread: the models are tiny and the suite shares two cores
    env.update(RNNLM_CACHE=str(cache), PYTHONWARNINGS="ignore", COLUMNS="200", NO_COLOR="1", OMP_NUM_THREADS="1")
    env.pop("RNNLM_DEBUG", None)
    return env


def run(args: list[str], cwd: Path, cache: Path, stdin: str | bytes | None = None, script: bool = False,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real command: `python -m rnnlm ARGS`, or the `rnnlm` console script."""
    cmd = [shutil.which("rnnlm")] if script else [sys.executable, "-m", "rnnlm"]
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env_for(cache), input=stdin,
                          capture_output=True, timeout=timeout)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def invoke(args: list[str], stdin: str | None = None):
    """Run the CLI in-process (CliRunner); stderr is kept apart from stdout."""
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def assert_usage_error(result, *needles: str) -> str:
    """Exit 2, a short message naming the problem, no traceback. Works for CliRunner and subprocess results."""
    rc = getattr(result, "exit_code", getattr(result, "returncode", None))
    err, out = result.stderr, result.stdout
    assert rc == 2, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}\nexception: {getattr(result, 'exception', None)!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 6, err
    low = err.lower()
    for n in needles:
        assert n.lower() in low, f"{n!r} not in:\n{err}"
    return err


# -- module fixtures: one word-level and one char-level run ------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "cache").mkdir()
    (d / "word.txt").write_text(word_text(400, 1), encoding="utf-8")
    (d / "word_test.txt").write_text(word_text(40, 2), encoding="utf-8")
    (d / "chars").mkdir()
    (d / "chars" / "train.txt").write_text(char_text(120, 3), encoding="utf-8")
    (d / "chars" / "valid.txt").write_text(char_text(10, 4), encoding="utf-8")
    (d / "chars" / "test.txt").write_text(char_text(10, 5), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def word_run(work) -> Path:
    run_dir = work / "word_run"
    proc = ok(run(["train", "--data", work / "word.txt", "--out", run_dir, "data.level=word", *TINY],
                  work, work / "cache", script=True))
    assert f"run directory: {run_dir}" in proc.stdout
    return run_dir


@pytest.fixture(scope="module")
def char_run(work) -> Path:
    cfg = work / "char.yaml"
    cfg.write_text("data:\n  level: char\nmodel:\n  cell: gru\n  hidden_size: 32\n  embedding_size: 16\n"
                   "  num_layers: 1\ntrain:\n  batch_size: 4\n  bptt: 16\n  max_steps: 30\n  eval_every: 10\n"
                   "  log_every: 5\n  device: cpu\n", encoding="utf-8")
    run_dir = work / "char_run"
    ok(run(["train", "--config", cfg, "--data", work / "chars", "--out", run_dir], work, work / "cache"))
    return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# -- the run directory -------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["word", "char"])
def test_run_directory_contents(level, word_run, char_run):
    run_dir = word_run if level == "word" else char_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "vocab.json", "best.pt", "last.pt", "metrics.jsonl", "loss.png"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n == ".lock"], names

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["level"] == level and cfg["model"]["hidden_size"] == 32 and cfg["train"]["max_steps"] == 30
    assert set(cfg) >= {"data", "model", "train"}
    if level == "char":
        assert cfg["model"]["cell"] == "gru" and cfg["name"] == "char"

    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab["tokens"][:2] == ["<unk>", "<eos>"] and len(vocab["tokens"]) == len(set(vocab["tokens"]))
    if level == "word":
        assert set(WORDS[:13]) & set(vocab["tokens"]) and all(" " not in t for t in vocab["tokens"])
    else:
        assert all(len(t) == 1 for t in vocab["tokens"][2:])

    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    assert last["format"] == FORMAT and "trainer" in last and "trainer" not in best
    assert last["vocab"]["tokens"] == vocab["tokens"]

    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("level", ["word", "char"])
def test_metrics_jsonl_events_and_fields(level, word_run, char_run):
    events = read_metrics(word_run if level == "word" else char_run)
    for e in events:
        assert {"event", "step", "tokens", "time"} <= set(e), e
        assert isinstance(e["step"], int) and isinstance(e["tokens"], int) and e["time"] >= 0
    kinds = [e["event"] for e in events]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert len(train) == 6 and len(evals) >= 3
    for e in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= set(e)
        assert e["loss"] > 0 and e["lr"] > 0 and e["grad_norm"] >= 0 and e["tokens_per_sec"] > 0
    assert [e["step"] for e in train] == [5, 10, 15, 20, 25, 30]
    assert all(b["tokens"] > a["tokens"] for a, b in zip(train, train[1:]))
    assert train[-1]["tokens"] == 30 * 4 * 16
    for e in evals:
        assert e["split"] == "valid" and math.isclose(e["ppl"], math.exp(e["loss"]), rel_tol=1e-6)
        if level == "char":
            assert math.isclose(e["bpc"], e["loss"] / math.log(2), rel_tol=1e-6)
    end = events[-1]
    assert {"best_valid_loss", "best_valid_ppl", "train_tokens_per_sec"} <= set(end)
    assert end["step"] == 30 and end["best_valid_loss"] == min(e["loss"] for e in evals)
    assert math.isclose(end["best_valid_ppl"], math.exp(end["best_valid_loss"]), rel_tol=1e-6)
    assert end["train_tokens_per_sec"] > 0
    assert train[-1]["loss"] < train[0]["loss"]  # it learned something


# -- sample --------------------------------------------------------------------------------------

def test_sample_json_shape_length_and_seed(work, word_run):
    args = ["sample", "--checkpoint", word_run, "--json", "--num-samples", "4", "--max-length", "7", "--seed", "3"]
    first = ok(run(args, work, work / "cache"))
    lines = first.stdout.splitlines()
    assert len(lines) == 4
    vocab = set(json.loads((word_run / "vocab.json").read_text())["tokens"])
    for ln in lines:
        s = json.loads(ln)
        assert {"text", "tokens", "stop"} <= set(s)
        assert 0 <= s["tokens"] <= 7 and s["stop"] in ("eos", "length")
        assert (s["stop"] == "length") == (s["tokens"] == 7)
        words = s["text"].split()
        assert len(words) == s["tokens"] and set(words) <= vocab - {"<unk>", "<eos>"}
    again = invoke(args)
    assert again.exit_code == 0 and again.stdout == first.stdout  # the same seed, the same text


def test_sample_plain_output_and_prime(work, word_run):
    r = invoke(["sample", "--checkpoint", word_run, "--num-samples", "2", "--max-length", "5", "--seed", "1",
                "--prime", "the cat"])
    assert r.exit_code == 0, r.stderr
    blocks = r.stdout.split("\n\n")
    assert len(blocks) == 3 and blocks[2] == ""  # each sample followed by a blank line
    for b in blocks[:2]:
        assert b.startswith("the cat") and len(b.split()) <= 2 + 5


def test_sample_single_streams_and_stops(word_run):
    r = invoke(["sample", "-m", word_run, "-l", "0", "--seed", "1", "--prime", "the dog"])
    assert r.exit_code == 0 and r.stdout == "the dog\n\n"
    r = invoke(["sample", "-m", word_run, "--json", "-l", "0", "-n", "2"])
    assert [json.loads(x)["stop"] for x in r.stdout.splitlines()] == ["length", "length"]
    r = invoke(["sample", "-m", word_run, "--json", "-n", "0"])
    assert r.exit_code == 0 and r.stdout == ""
    greedy = [invoke(["sample", "-m", word_run, "--json", "-l", "12", "--seed", str(s), *flag]).stdout
              for s, flag in ((1, ["--greedy"]), (2, ["--greedy"]), (3, ["--temperature", "0"]))]
    assert greedy[0] == greedy[1] == greedy[2]


def test_a_warning_about_the_prime_comes_before_the_prime(word_run, work):
    """Unknown prime tokens: the warning (stderr) is written before the prime starts the sample on
    stdout, so on a terminal it does not land inside the text."""
    proc = subprocess.run([sys.executable, "-m", "rnnlm", "sample", "-m", str(word_run), "--prime", "zebra quokka",
                           "-l", "5", "--seed", "1"], cwd=work, env=env_for(work / "cache"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, out
    assert out.index("prime token(s) are not in the vocabulary") < out.index("zebra quokka")
    assert out.count("zebra quokka") == 1


def test_sample_eos_stops_early(word_run):
    """Lines are 7 words long: a sample from the line model ends at EOS well before 40 tokens."""
    r = invoke(["sample", "-m", word_run, "--json", "-n", "8", "-l", "40", "--seed", "0", "--temperature", "0.5"])
    stops = [json.loads(x) for x in r.stdout.splitlines()]
    assert any(s["stop"] == "eos" and s["tokens"] < 40 for s in stops)


def test_sample_prime_of_unknown_words_warns_but_works(work, word_run):
    proc = ok(run(["sample", "--checkpoint", word_run, "--prime", "zebra xylophone", "--max-length", "3",
                   "--seed", "2"], work, work / "cache"))
    assert "warning" in proc.stderr.lower() and "vocabulary" in proc.stderr
    assert proc.stdout.startswith("zebra xylophone")
    assert "<unk>" not in proc.stdout


def test_char_sample(char_run):
    r = invoke(["sample", "-m", char_run, "--json", "-n", "2", "-l", "25", "--seed", "5", "--prime", "the "])
    assert r.exit_code == 0, r.stderr
    for ln in r.stdout.splitlines():
        s = json.loads(ln)
        assert s["text"].startswith("the ") and s["tokens"] <= 25
        assert len(s["text"]) == 4 + s["tokens"]  # one character per token


# -- eval-perplexity ---------------------------------------------------------------------------

def test_eval_perplexity_json_word(work, word_run):
    proc = ok(run(["eval-perplexity", "--checkpoint", word_run, "--data", work / "word_test.txt", "--json"],
                  work, work / "cache", script=True))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert {"tokens", "oov", "loss", "ppl", "bits_per_token"} <= set(res)
    assert res["tokens"] == 40 * 8  # 7 words + EOS per line
    assert res["oov"] == 0
    assert math.isclose(res["ppl"], math.exp(res["loss"]), rel_tol=1e-6)
    assert math.isclose(res["bits_per_token"], res["loss"] / math.log(2), rel_tol=1e-6)
    assert 1 < res["ppl"] < 25  # a 25-word vocabulary; the model learned the pattern a little
    # batched evaluation agrees to 0.5 %
    r = invoke(["eval-perplexity", "-m", word_run, "-d", work / "word_test.txt", "--json", "--batch-size", "4"])
    assert r.exit_code == 0 and math.isclose(json.loads(r.stdout)["ppl"], res["ppl"], rel_tol=5e-3)


def test_eval_perplexity_with_a_continuous_cache(work, word_run):
    data = work / "word_test.txt"
    plain = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json"]).stdout)
    res = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--cache-size", "100",
                                "--cache-theta", "0.5,2", "--cache-lambda", "0,0.2"]).stdout)
    assert {k: res[k] for k in ("loss", "ppl", "tokens")} == {k: plain[k] for k in ("loss", "ppl", "tokens")}
    assert [(e["size"], e["theta"], e["lambda"]) for e in res["cache"]] == [
        (100, 0.5, 0.0), (100, 0.5, 0.2), (100, 2.0, 0.0), (100, 2.0, 0.2)]
    for e in res["cache"]:
        assert math.isclose(e["ppl"], math.exp(e["loss"]), rel_tol=1e-12)
        if e["lambda"] == 0:
            assert math.isclose(e["loss"], res["loss"], rel_tol=1e-12)
    sizes = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--cache-size", "20,100",
                                  "--cache-theta", "0.5,2", "--cache-lambda", "0,0.2"]).stdout)
    assert [e["size"] for e in sizes["cache"]] == [20] * 4 + [100] * 4
    assert [e["loss"] for e in sizes["cache"][4:]] == [e["loss"] for e in res["cache"]]
    assert "lowest" in ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--cache-size", "20,100"]).stdout
    one = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--cache-size", "100"]).stdout)
    assert [(e["theta"], e["lambda"]) for e in one["cache"]] == [(1.0, 0.1)]          # the defaults
    table = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--cache-size", "100"]).stdout
    assert "with cache" in table and f"{one['cache'][0]['ppl']:.3f}" in table
    grid = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--cache-size", "100", "--cache-theta", "0.5,2",
                      "--cache-lambda", "0,0.2"]).stdout
    best = min(res["cache"], key=lambda e: e["loss"])
    assert "lowest" in grid and f"{best['ppl']:.3f}" in grid
    for args, needles in ((["--cache-theta", "1"], ("--cache-theta", "--cache-size")),
                          (["--cache-lambda", "0.1"], ("--cache-lambda", "--cache-size")),
                          (["--cache-size", "0"], ("--cache-size", ">= 1")),
                          (["--cache-size", "10.5"], ("--cache-size", "whole numbers")),
                          (["--cache-size", "10,x"], ("--cache-size", "comma-separated")),
                          (["--cache-size", "10", "--cache-lambda", "1.5"], ("--cache-lambda", "[0, 1]")),
                          (["--cache-size", "10", "--cache-theta", "-1"], ("--cache-theta", ">= 0")),
                          (["--cache-size", "10", "--cache-theta", "a,b"], ("--cache-theta", "comma-separated")),
                          (["--cache-size", "10", "--cache-theta", "1,1"], ("--cache-theta", "twice")),
                          (["--cache-size", "10", "--cache-theta", "nan"], ("--cache-theta", ">= 0")),
                          (["--cache-size", "10", "--cache-theta", "1e999"], ("--cache-theta", ">= 0")),
                          (["--cache-size", "10", "--cache-lambda", ""], ("--cache-lambda", "comma-separated"))):
        assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", data, *args]), *needles)


def test_eval_perplexity_with_dynamic_evaluation(work, word_run):
    data = work / "word_test.txt"
    plain = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json"]).stdout)
    res = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "0,0.5",
                                "--dynamic-segment", "8", "--dynamic-decay", "0.01"]).stdout)
    assert res["loss"] == plain["loss"] and "cache" not in res
    assert [(e["lr"], e["segment"], e["decay"]) for e in res["dynamic"]] == [(0.0, 8, 0.01), (0.5, 8, 0.01)]
    assert math.isclose(res["dynamic"][0]["loss"], plain["loss"], rel_tol=1e-6)      # lr 0: the static model
    assert res["dynamic"][1]["loss"] != res["dynamic"][0]["loss"]
    one = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--dynamic-lr", "0.5"]).stdout
    assert "with dynamic evaluation (lr=0.5, segment 20, decay 0)" in one
    grid = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--dynamic-lr", "0,0.5", "--cache-size", "50",
                      "--cache-theta", "1,2"]).stdout
    assert "dynamic evaluation (segments of 20, decay 0)" in grid and "continuous cache of 50" in grid
    assert "with dynamic evaluation and a cache of 50" in grid              # the two combined
    both = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "0,0.5",
                                 "--cache-size", "50", "--cache-theta", "1,2"]).stdout)
    for e in both["dynamic"]:
        assert [(c["theta"], c["lambda"]) for c in e["cache"]] == [(1.0, 0.1), (2.0, 0.1)]
    for c, c0 in zip(both["dynamic"][0]["cache"], both["cache"]):          # lr 0 + cache = the static cache
        assert math.isclose(c["loss"], c0["loss"], rel_tol=1e-6)
    one_both = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--dynamic-lr", "0.5", "--cache-size",
                          "50"]).stdout
    assert "with dynamic evaluation and cache" in one_both
    for args, needles in ((["--dynamic-decay", "0.1"], ("--dynamic-decay", "--dynamic-lr")),
                          (["--dynamic-segment", "5"], ("--dynamic-segment", "--dynamic-lr")),
                          (["--dynamic-lr", "-1"], ("--dynamic-lr", ">= 0")),
                          (["--dynamic-lr", "x"], ("--dynamic-lr", "comma-separated")),
                          (["--dynamic-lr", "1", "--dynamic-decay", "2"], ("--dynamic-decay", "[0, 1]")),
                          (["--dynamic-lr", "1", "--dynamic-segment", "0"], ("--dynamic-segment", ">= 1")),
                          (["--dynamic-lr", "inf"], ("--dynamic-lr", ">= 0")),
                          (["--dynamic-lr", "1", "--dynamic-decay", "nan"], ("--dynamic-decay", "[0, 1]"))):
        assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", data, *args]), *needles)


def test_eval_perplexity_with_the_rms_rule(work, word_run):
    data, train = work / "word_test.txt", work / "word.txt"
    res = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "0,1e-4",
                                "--dynamic-rms-data", train, "--dynamic-decay", "0.02"]).stdout)
    assert [(e["lr"], e["decay"], e["rule"]) for e in res["dynamic"]] == [(0.0, 0.02, "rms"), (1e-4, 0.02, "rms")]
    assert math.isclose(res["dynamic"][0]["loss"], res["loss"], rel_tol=1e-6)       # lr 0: the static model
    assert res["dynamic"][1]["loss"] != res["dynamic"][0]["loss"]
    sgd = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "1e-4",
                                "--dynamic-decay", "0.02"]).stdout)
    assert sgd["dynamic"][0]["rule"] == "sgd" and sgd["dynamic"][0]["loss"] != res["dynamic"][1]["loss"]
    one = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--dynamic-lr", "1e-4",
                     "--dynamic-rms-data", train]).stdout
    assert "with dynamic evaluation (lr=0.0001, RMS, segment 20, decay 0, ε" in one       # ε 0.1, the default
    assert "0.1)" in one.split("decay 0, ε", 1)[1][:40]                                    # (the row may wrap)
    eps = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "1e-4",
                                "--dynamic-rms-data", train, "--dynamic-rms-eps", "0.1,1"]).stdout)["dynamic"]
    assert [(e["eps"], e["rule"]) for e in eps] == [(0.1, "rms"), (1.0, "rms")] and eps[0]["loss"] != eps[1]["loss"]
    default = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "1e-4",
                                    "--dynamic-rms-data", train]).stdout)["dynamic"][0]
    assert default["eps"] == 0.1 and math.isclose(eps[0]["loss"], default["loss"], rel_tol=1e-12)
    assert "eps" not in sgd["dynamic"][0]                                                        # SGD has no ε
    grid = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--dynamic-lr", "0,1e-4",
                      "--dynamic-rms-data", train]).stdout
    assert "dynamic evaluation (RMS, segments of 20, decay 0, ε 0.1)" in grid
    # several decays: every (lr, decay) pair, from one measurement of the statistics
    pairs = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--json", "--dynamic-lr", "0,1e-4",
                                  "--dynamic-decay", "0,0.5", "--dynamic-rms-data", train]).stdout)["dynamic"]
    assert [(e["lr"], e["decay"]) for e in pairs] == [(0.0, 0.0), (0.0, 0.5), (1e-4, 0.0), (1e-4, 0.5)]
    assert math.isclose(pairs[1]["loss"], pairs[0]["loss"], rel_tol=1e-6) and pairs[3]["loss"] != pairs[2]["loss"]
    table = ok_invoke(["eval-perplexity", "-m", word_run, "-d", data, "--dynamic-lr", "0,1e-4",
                       "--dynamic-decay", "0,0.5", "--dynamic-rms-data", train]).stdout
    assert "dynamic evaluation (RMS, segments of 20, ε 0.1)" in table and "decay" in table
    for args, needles in ((["--dynamic-rms-data", train], ("--dynamic-rms-data", "--dynamic-lr")),
                          (["--dynamic-lr", "1e-4", "--dynamic-rms-data", work / "nope.txt"],
                           ("--dynamic-rms-data", "not found")),
                          (["--dynamic-lr", "1e-4", "--dynamic-rms-data", work], ("--dynamic-rms-data", "regular file")),
                          (["--dynamic-lr", "1e-4", "--dynamic-rms-data", ""], ("--dynamic-rms-data", "empty")),
                          (["--dynamic-lr", "1e-4", "--dynamic-decay", "0,2"], ("--dynamic-decay", "[0, 1]")),
                          (["--dynamic-lr", "1e-4", "--dynamic-decay", "0.1,0.1"], ("--dynamic-decay", "twice")),
                          (["--dynamic-rms-eps", "0.1"], ("--dynamic-rms-eps", "--dynamic-lr", "1e-4")),
                          (["--dynamic-lr", "1e-4", "--dynamic-rms-eps", "0.1"], ("--dynamic-rms-eps",
                                                                                  "--dynamic-rms-data")),
                          (["--dynamic-lr", "1e-4", "--dynamic-rms-data", train, "--dynamic-rms-eps", "0"],
                           ("--dynamic-rms-eps", "> 0"))):
        assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", data, *args]), *needles)


def test_eval_perplexity_counts_oov_and_human_table(work, word_run):
    f = work / "oov.txt"
    f.write_text("the zebra sat on the rug\n", encoding="utf-8")
    r = invoke(["eval-perplexity", "-m", word_run, "-d", f, "--json"])
    res = json.loads(r.stdout)
    assert res["oov"] == 1 and res["tokens"] == 7
    r = invoke(["eval-perplexity", "-m", word_run, "-d", f])
    assert r.exit_code == 0 and "perplexity" in r.stdout and "oov" in r.stdout
    # a path longer than the table is printed whole on its own line (it used to wrap inside the title)
    deep = work / ("a_long_folder_name_" * 4) / "and_a_long_file_name_too.txt"
    deep.parent.mkdir(exist_ok=True)
    deep.write_text("the cat sat on the rug\n", encoding="utf-8")
    r = invoke(["eval-perplexity", "-m", word_run, "-d", deep])
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == str(deep)


def test_eval_perplexity_glob_equals_the_concatenated_file(work, char_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "other"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(char_text(20, 7), encoding="utf-8")
    (folder / "sub" / "a.txt").write_text(char_text(20, 8).rstrip("\n"), encoding="utf-8")   # no final newline
    (folder / ".hidden.txt").write_text("left out\n", encoding="utf-8")
    (folder / "notes.md").write_text("not matched\n", encoding="utf-8")
    by_hand = tmp_path / "by_hand.txt"   # what the docs say --glob reads: path order, a blank line between files
    by_hand.write_text((folder / "b.txt").read_text() + "\n" + (folder / "sub" / "a.txt").read_text() + "\n",
                       encoding="utf-8")
    want = json.loads(ok_invoke(["eval-perplexity", "-m", char_run, "-d", by_hand, "--json"]).stdout)
    got = json.loads(ok_invoke(["eval-perplexity", "-m", char_run, "-d", folder, "--glob", "**/*.txt",
                                "--json"]).stdout)
    assert got["tokens"] == want["tokens"] and got["nll"] == pytest.approx(want["nll"], rel=1e-9)
    assert got["source"].startswith("2 files matching '**/*.txt' under")
    r = ok_invoke(["eval-perplexity", "-m", char_run, "-d", folder, "--glob", "**/*.txt"])
    assert r.stdout.splitlines()[0].startswith("2 files matching")
    assert_usage_error(invoke(["eval-perplexity", "-m", char_run, "-d", folder]), "is a directory", "--glob")
    assert_usage_error(invoke(["eval-perplexity", "-m", char_run, "-d", by_hand, "--glob", "*.txt"]),
                       "--glob needs --data to be a directory")
    assert_usage_error(invoke(["eval-perplexity", "-m", char_run, "-d", folder, "--glob", "*.rst"]),
                       "no files under", "--glob='*.rst'")


def test_eval_perplexity_char(work, char_run):
    r = invoke(["eval-perplexity", "-m", char_run, "-d", work / "chars" / "test.txt", "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert math.isclose(res["bpc"], res["loss"] / math.log(2), rel_tol=1e-6)
    text = (work / "chars" / "test.txt").read_text()
    paragraphs = [q for q in text.strip("\n").split("\n\n")]
    assert res["tokens"] == sum(len(q) + 1 for q in paragraphs)  # every character, and one EOS per paragraph
    assert res["oov"] == 0 and res["words"] == len(text.split()) + len(paragraphs)


# -- score ---------------------------------------------------------------------------------------

def test_score_json_from_stdin(work, word_run):
    sentences = "the cat sat on the red rug\nthe dog ran on the small rug\nrug the on sat\n"
    proc = ok(run(["score", "--checkpoint", word_run, "--json"], work, work / "cache", stdin=sentences))
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == sentences.splitlines()
    for r in rows:
        assert {"text", "tokens", "logprob", "ppl"} <= set(r)
        assert r["tokens"] == len(r["text"].split()) + 1 and r["logprob"] < 0
        assert math.isclose(r["ppl"], math.exp(-r["logprob"] / r["tokens"]), rel_tol=1e-6)
    assert rows[0]["logprob"] / rows[0]["tokens"] > rows[2]["logprob"] / rows[2]["tokens"]  # grammatical wins


def test_score_file_and_table(work, word_run):
    f = work / "sents.txt"
    f.write_text("the cat sat on the rug\n\n[bold]the dog[/] ran\n", encoding="utf-8")
    r = invoke(["score", "-m", word_run, "-i", f])
    assert r.exit_code == 0, r.stderr
    assert "[bold]the dog[/] ran" in r.stdout  # user text is shown as is, never as markup
    r = invoke(["score", "-m", word_run, "-i", f, "--json"])
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["text"] for x in rows] == ["the cat sat on the rug", "", "[bold]the dog[/] ran"]  # line i = result i
    assert rows[1]["tokens"] == 1 and rows[1]["logprob"] < 0     # the empty line: <eos> alone


def test_eval_and_score_read_other_encodings(work, word_run):
    """--encoding decodes the evaluated or scored text; without it the model's own data.encoding
    is used (utf-8 here, latin-1 for a model trained on latin-1 text), and the message of an
    undecodable file names the option."""
    text = "the caf\xe9 sat on the rug\nthe cat ran on the red rug\n"
    lat, utf = work / "enc_latin1.txt", work / "enc_utf8.txt"
    lat.write_bytes(text.encode("latin-1"))
    utf.write_bytes(text.encode("utf-8"))
    assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", lat]), "enc_latin1.txt", "line 1",
                       "--encoding")
    want = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", utf, "--json"]).stdout)
    got = json.loads(ok_invoke(["eval-perplexity", "-m", word_run, "-d", lat, "--json", "--encoding",
                                "latin-1"]).stdout)
    assert got.pop("file") == str(lat) and want.pop("file") == str(utf)
    assert got == want and got["oov"] == 1
    assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", lat, "--encoding", "nope"]),
                       "unknown text encoding 'nope' (--encoding)")
    assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", lat, "--encoding", "utf-16"]),
                       "--encoding=utf-16 is not supported")
    assert_usage_error(run(["score", "-m", word_run, "--json"], work, work / "cache",
                           stdin=text.encode("latin-1")), "standard input", "line 1", "--encoding")
    rows = [json.loads(x) for x in ok(run(["score", "-m", word_run, "--json", "--encoding", "latin-1"], work,
                                          work / "cache", stdin=text.encode("latin-1"))).stdout.splitlines()]
    assert [r["text"] for r in rows] == text.splitlines()
    assert rows == [json.loads(x) for x in ok_invoke(["score", "-m", word_run, "-i", utf, "--json"]).stdout.splitlines()]
    # a model trained on latin-1 text reads latin-1 by default
    (work / "lat_corpus").mkdir()
    (work / "lat_corpus" / "train.txt").write_bytes((word_text(200, 3) + text).encode("latin-1"))
    lat_run = work / "lat_run"
    ok(run(["train", "--data", work / "lat_corpus", "--out", lat_run, "data.level=word", "data.encoding=latin-1",
            "data.split=[0.9,0.1,0.0]", *TINY], work, work / "cache"))
    res = json.loads(ok_invoke(["eval-perplexity", "-m", lat_run, "-d", lat, "--json"]).stdout)
    assert res["oov"] == 0 and res["tokens"] == 15
    rows = [json.loads(x) for x in ok(run(["score", "-m", lat_run, "--json"], work, work / "cache",
                                          stdin=text.encode("latin-1"))).stdout.splitlines()]
    assert rows[0]["text"] == "the caf\xe9 sat on the rug"


def test_train_print_config_prints_and_does_not_train(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ok_invoke(["train", "--print-config", "--data", work / "word.txt", "data.level=word", "model.hidden_size=77"])
    assert "  hidden_size: 77 " in r.stdout and "# recurrent state size" in r.stdout
    assert f"  path: {work / 'word.txt'}" in r.stdout and r.stdout.startswith("name: word\n")
    assert not (tmp_path / "runs").exists()
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout, encoding="utf-8")
    again = ok_invoke(["train", "--print-config", "--config", printed])
    assert again.stdout == r.stdout                       # what it prints is a config that loads back
    assert_usage_error(invoke(["train", "--print-config", "--resume", "--out", work / "word_run"]), "--print-config")
    assert_usage_error(invoke(["train", "--print-config", "model.hiden_size=3"]), "model.hidden_size")


def ok_invoke(args: list[str]):
    r = invoke(args)
    assert r.exit_code == 0, f"exit {r.exit_code}\n{r.stdout}\n{r.stderr}\n{r.exception!r}"
    return r


# -- the command itself ------------------------------------------------------------------------

def test_version_and_help_via_python_m(work):
    proc = ok(run(["--version"], work, work / "cache"))
    assert proc.stdout.strip() == f"rnnlm {__version__}"
    proc = ok(run(["--help"], work, work / "cache", script=True))
    for c in COMMANDS:
        assert c in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command):
    r = invoke([command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.stdout and "--help" in r.stdout
    r2 = invoke([command, "-h"])
    assert r2.exit_code == 0 and r2.stdout == r.stdout


def test_bare_command_shows_help():
    r = invoke([])
    assert "Usage" in r.stdout + r.stderr and r.exit_code in (0, 2)


@pytest.mark.parametrize("args, needle", [
    (["sample", "--checkpoint"], "requires an argument"),
    (["sample"], "--checkpoint"),
    (["eval-perplexity", "--checkpoint", "x"], "--data"),
    (["train", "--no-such-option"], "No such option"),
    (["frobnicate"], "No such command"),
    (["sample", "-m", "x", "--num-samples", "many"], "--num-samples"),
    (["sample", "-m", "x", "--temperature", "hot"], "--temperature"),
])
def test_click_usage_errors_exit_2(args, needle):
    r = invoke(args)
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_quickstart_default_corpus(tmp_path):
    """`rnnlm train` with no --config and no --data: the embedded corpus, offline, a default run dir."""
    cache = tmp_path / "cache"
    proc = ok(run(["train", "train.max_steps=3", "model.hidden_size=16", "model.embedding_size=8",
                   "model.num_layers=1", "train.batch_size=4", "train.bptt=16", "train.eval_max_tokens=2000",
                   "train.log_every=1", "train.device=cpu"], tmp_path, cache, script=True))
    runs = [d for d in (tmp_path / "runs").iterdir() if not d.is_symlink()]  # (runs/latest may point to it)
    assert len(runs) == 1 and runs[0].name.startswith("default-")
    assert f"run directory: {Path('runs') / runs[0].name}" in proc.stdout
    assert "standard library" in proc.stderr
    events = read_metrics(runs[0])
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3]
    assert (runs[0] / "best.pt").is_file() and (runs[0] / "loss.png").is_file()
    assert yaml.safe_load((runs[0] / "config.yaml").read_text())["data"]["path"] is None
    r = invoke(["sample", "-m", runs[0], "-l", "20", "--seed", "0"])
    assert r.exit_code == 0 and len(r.stdout) >= 2


def test_short_run_still_logs_a_train_event(work):
    out = work / "short_run"
    r = invoke(["train", "--data", work / "word.txt", "--out", out, "data.level=word", *TINY,
                "train.max_steps=3", "train.log_every=50"])
    assert r.exit_code == 0, r.stderr
    assert [e["step"] for e in read_metrics(out) if e["event"] == "train"] == [3]


def test_plot(work, word_run):
    target = work / "curves.png"
    r = invoke(["plot", word_run, "--out", target])
    assert r.exit_code == 0 and target.read_bytes()[:4] == b"\x89PNG" and str(target) in r.stdout
    (word_run / "loss.png").unlink()
    r = invoke(["plot", word_run])
    assert r.exit_code == 0 and (word_run / "loss.png").is_file()
    assert_usage_error(invoke(["plot", work]), "metrics.jsonl")


def test_plot_several_runs_overlaid(work, word_run):
    other = work / "other_run"
    r = invoke(["train", "--data", work / "word.txt", "--out", other, "data.level=word", *TINY,
                "train.max_steps=6", "train.log_every=2"])
    assert r.exit_code == 0, r.stderr
    target = work / "both.png"
    r = invoke(["plot", word_run, other, "--out", target, "--x", "time"])
    assert r.exit_code == 0, r.stderr
    assert target.read_bytes()[:4] == b"\x89PNG"
    assert_usage_error(invoke(["plot", word_run, other]), "--out")          # where would it go?
    assert_usage_error(invoke(["plot", word_run, "--x", "epochs"]), "--x")  # not an axis
    old = work / "old_metrics"  # a metrics file without the key asked for: a message, not a KeyError
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"event": "train", "step": 1, "tokens": 8, "loss": 3.0}\n')
    assert_usage_error(invoke(["plot", old, "--x", "time"]), "against time")
    assert invoke(["plot", old, "--x", "step"]).exit_code == 0


def test_markup_in_paths_is_printed_as_is(work):
    r = invoke(["sample", "--checkpoint", work / "[/bold]x[red]"])
    err = assert_usage_error(r, "checkpoint not found")
    assert "[/bold]x[red]" in err


def test_markup_in_training_paths(work):
    d = work / "data[/b]"  # a folder "data[" holding a folder "b]"
    d.mkdir(parents=True)
    (d / "train.txt").write_text(word_text(100, 7), encoding="utf-8")
    r = invoke(["train", "--data", d, "--out", work / "run[/i]", "data.level=word", *TINY, "train.max_steps=2"])
    assert r.exit_code == 0, r.stderr


# -- bad input: exit 2, one clear message, no traceback ------------------------------------------

@pytest.fixture(scope="module")
def bad(work) -> Path:
    """Bad data and config files (written once)."""
    d = work / "bad"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (d / "utf16.txt").write_bytes("the cat sat\nthe dog ran\n".encode("utf-16"))
    (d / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9 au lait\n".encode("latin-1"))
    (d / "notrain").mkdir()
    (d / "notrain" / "valid.txt").write_text(word_text(5, 9))
    for split in ("valid", "test"):
        sub = d / f"empty_{split}"
        sub.mkdir()
        (sub / "train.txt").write_text(word_text(50, 9))
        (sub / split).with_suffix(".txt").write_text("\n\n   \n\n")
    (d / "tiny.txt").write_text("a b\n")
    (d / "syntax.yaml").write_text("model:\n  hidden_size: 64\n  cell: [lstm\ntrain: {}\n")
    (d / "unknown_section.yaml").write_text("modle:\n  hidden_size: 64\n")
    (d / "unknown_key.yaml").write_text("train:\n  learning_rate: 0.1\n")
    (d / "wrong_type.yaml").write_text("model:\n  hidden_size: large\n")
    return d


@pytest.mark.parametrize("case, needles", [
    ("missing", ["not found", "nope.txt"]),
    ("empty", ["empty.txt", "empty"]),
    ("binary", ["binary.bin", "binary"]),
    ("latin1", ["latin1.txt", "line 3", "byte offset 21", "data.encoding"]),
    ("notrain", ["train.txt"]),
    ("empty_valid", ["valid", "tokenizes to nothing"]),
    ("empty_test", ["test", "tokenizes to nothing"]),
    ("tiny", ["too small", "tokens", "train.batch_size"]),
])
def test_bad_data(work, bad, case, needles):
    path = {"missing": bad / "nope.txt", "empty": bad / "empty.txt", "binary": bad / "binary.bin",
            "latin1": bad / "latin1.txt", "notrain": bad / "notrain", "empty_valid": bad / "empty_valid",
            "empty_test": bad / "empty_test", "tiny": bad / "tiny.txt"}[case]
    out = work / f"never_{case}"
    # char level: blank-line separated paragraphs, so a file of blank lines has no token at all (at word level
    # with eos=line every blank line is an empty sentence, i.e. one <eos>, as in PTB/WikiText)
    level = "data.level=char" if case.startswith("empty_") else "data.level=word"
    assert_usage_error(invoke(["train", "--data", path, "--out", out, *TINY, level]), *needles)
    assert not (out / "best.pt").exists()


@pytest.mark.parametrize("args, needles", [
    (["--config", "missing.yaml"], ["config file not found", "missing.yaml"]),
    (["--config", "syntax.yaml"], ["syntax.yaml", "line 4", "column"]),
    (["--config", "unknown_section.yaml"], ["unknown config section 'modle'", "'model'"]),
    (["--config", "unknown_key.yaml"], ["train.learning_rate", "'train.lr'"]),
    (["--config", "wrong_type.yaml"], ["model.hidden_size", "integer"]),
    (["model.hiden_size=10"], ["model.hiden_size", "did you mean 'model.hidden_size'"]),
    (["trian.lr=1"], ["trian.lr", "'train.lr'"]),
    (["train.lr=fast"], ["train.lr", "number"]),
    (["model.hidden_size=0"], ["model.hidden_size", ">= 1"]),
    (["model.hidden_size=99999999999999999999"], ["model.hidden_size", "<= 2147483647"]),
    (["model.num_layers=99999999999999999999"], ["model.num_layers", "<= 1024"]),
    (["model.head_layers=5000"], ["model.head_layers", "<= 1024"]),
    (["train.batch_size=-4"], ["train.batch_size", ">= 1"]),
    (["train.bptt=0"], ["train.bptt"]),
    (["model.dropout=1.5"], ["model.dropout", "[0, 1]"]),
    (["sample.top_p=2"], ["sample.top_p", "[0, 1]"]),
    (["model.cell=lstmm"], ["model.cell", "lstm"]),
    (["train.optimizer=adamax"], ["train.optimizer", "sgd"]),
    (["train.lr_schedule=linear"], ["train.lr_schedule", "cosine"]),
    (["train.precision=fp8"], ["train.precision", "bf16"]),
    (["hidden_size=3"], ["hidden_size", "model.hidden_size"]),
    (["model.hidden_size"], ["KEY=VALUE"]),
    (["train.min_lr=1"], ["train.min_lr", "below train.lr"]),
])
def test_bad_config(work, bad, args, needles):
    cmd = ["train", "--data", work / "word.txt", "--out", work / "never"]
    cmd += [bad / a if a.endswith(".yaml") else a for a in args]
    assert_usage_error(invoke(cmd), *needles)
    assert not (work / "never").exists()


def test_default_corpus_with_an_unwritable_cache(work):
    """The offline quickstart corpus is written into the cache: a cache that cannot be written is
    the user's to fix (exit 2, naming the folder and the settings), not a traceback."""
    blocked = work / "word.txt" / "cache"                      # a "folder" under a file
    err = assert_usage_error(invoke(["train", "--out", work / "never", f"data.cache_dir={blocked}"]),
                             "cannot write the default corpus", "data.cache_dir", "--data")
    assert str(blocked) in " ".join(err.split()) or "word.txt" in err
    assert not (work / "never").exists()


def test_resume_with_nothing_to_resume(work):
    assert_usage_error(invoke(["train", "--resume", "--out", work / "no_such_run"]), "nothing to resume")
    (work / "empty_run").mkdir()
    assert_usage_error(invoke(["train", "--resume", "--out", work / "empty_run"]), "nothing to resume")
    assert_usage_error(invoke(["train", "--resume", "train.max_steps=1"]), "--out")


def test_existing_run_directory_without_resume(work, word_run):
    before = sorted(p.name for p in word_run.iterdir())
    err = assert_usage_error(invoke(["train", "--data", work / "word.txt", "--out", word_run, "data.level=word"]),
                             "already exists", "--resume")
    assert str(word_run) in err
    assert sorted(p.name for p in word_run.iterdir()) == before


# -- bad checkpoints -----------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def bad_ckpts(work, word_run) -> Path:
    d = work / "bad_ckpts"
    d.mkdir()
    good = (word_run / "best.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "random.pt").write_bytes(random.Random(0).randbytes(30000))
    data = torch.load(word_run / "best.pt", weights_only=True)
    torch.save({**data, "format_version": FORMAT_VERSION + 1}, d / "newer.pt")
    vocab = dict(data["vocab"])
    vocab["tokens"] = vocab["tokens"] + ["extra1", "extra2"]
    vocab.pop("counts", None)
    torch.save({**data, "vocab": vocab}, d / "mismatch.pt")
    torch.save({**data, "model": {"x": _Evil(d / "PWNED")}}, d / "evil.pt")
    (d / "run_without_checkpoints").mkdir()
    return d


@pytest.mark.parametrize("command", ["sample", "eval-perplexity", "score"])
@pytest.mark.parametrize("name, needles", [
    ("missing.pt", ["checkpoint not found"]),
    ("truncated.pt", ["truncated or corrupt"]),
    ("random.pt", ["not an rnnlm checkpoint"]),
    ("newer.pt", ["format version", "newer", "upgrade"]),
    ("mismatch.pt", ["do not match"]),
    ("evil.pt", ["refusing to load", "could run code"]),
    ("run_without_checkpoints", ["no checkpoint"]),
])
def test_bad_checkpoint(work, bad_ckpts, command, name, needles):
    path = bad_ckpts / name
    extra = {"sample": ["-l", "3"], "eval-perplexity": ["--data", work / "word_test.txt"],
             "score": ["--input", work / "word_test.txt"]}[command]
    err = assert_usage_error(invoke([command, "--checkpoint", path, *extra]), *needles)
    assert str(path) in err
    assert not (bad_ckpts / "PWNED").exists()


def test_bad_checkpoints_through_the_real_command(work, bad_ckpts):
    proc = run(["sample", "--checkpoint", bad_ckpts / "evil.pt"], work, work / "cache")
    assert_usage_error(proc, "refusing to load")
    assert not (bad_ckpts / "PWNED").exists()


# -- bad sampling / evaluation arguments ---------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--temperature", "-1"], ["--temperature", ">= 0"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "inf"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--top-p", "-0.2"], ["--top-p"]),
    (["--top-k", "-1"], ["--top-k", ">= 0"]),
    (["--max-length", "-1"], ["--max-length"]),
    (["--num-samples", "-2"], ["--num-samples"]),
])
def test_bad_sampling_arguments(word_run, args, needles):
    assert_usage_error(invoke(["sample", "--checkpoint", word_run, *args]), *needles)
    # the arguments are checked before the checkpoint is even read
    assert_usage_error(invoke(["sample", "--checkpoint", "missing.pt", *args]), *needles)


@pytest.mark.parametrize("command", ["eval-perplexity", "score"])
@pytest.mark.parametrize("case, needles", [
    ("missing", ["not found"]),
    ("empty", ["empty.txt"]),
    ("binary", ["binary"]),
    ("latin1", ["latin1.txt", "line 3"]),
    ("directory", ["directory"]),
    ("utf16", ["utf16.txt", "looks like UTF-16 text", "iconv -f UTF-16"]),  # the same words from both commands
])
def test_eval_and_score_bad_files(work, bad, word_run, command, case, needles):
    path = {"missing": bad / "nope.txt", "empty": bad / "empty.txt", "binary": bad / "binary.bin",
            "latin1": bad / "latin1.txt", "directory": bad / "notrain", "utf16": bad / "utf16.txt"}[case]
    opt = "--data" if command == "eval-perplexity" else "--input"
    assert_usage_error(invoke([command, "--checkpoint", word_run, opt, path]), *needles)


def test_eval_bad_batch_size_and_empty_stdin(word_run, work):
    assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "-d", work / "word_test.txt", "-b", "0"]),
                       "--batch-size")
    assert_usage_error(invoke(["score", "-m", word_run], stdin=""), "no sentences")
    assert_usage_error(invoke(["score", "-m", word_run], stdin="a\x00b\n"), "binary")


def test_bad_input_through_the_real_command(work, bad):
    """A few of the cases above as a real process: the exit code and stderr a shell sees."""
    proc = run(["train", "--data", bad / "nope.txt", "--out", work / "never"], work, work / "cache")
    assert_usage_error(proc, "data path not found")
    proc = run(["train", "--config", bad / "syntax.yaml"], work, work / "cache", script=True)
    assert_usage_error(proc, "line 4")
    proc = run(["sample", "--checkpoint"], work, work / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback_and_keeps_the_exit_code(work, bad):
    proc = run(["--debug", "train", "--data", bad / "nope.txt", "--out", work / "never"], work, work / "cache")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "UsageError" in proc.stderr
    assert "data path not found" in proc.stderr


def test_import_and_help_do_not_import_torch():
    """`import rnnlm` and the CLI's --help stay fast: PyTorch is imported on first real use."""
    code = ("import sys, rnnlm, rnnlm.cli\n"
            "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
            "from rnnlm import *\n"
            "import rnnlm as r\n"
            "assert all(getattr(r, n) is not None for n in r.__all__)\n"
            "assert 'torch' in sys.modules and r.Trainer.__module__ == 'rnnlm.train'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import rnnlm
    with pytest.raises(AttributeError):
        rnnlm.no_such_name


def test_train_says_whether_the_encoded_data_came_from_the_cache(tmp_path):
    (tmp_path / "c.txt").write_text(word_text(200, 7), encoding="utf-8")
    args = ["train", "--data", tmp_path / "c.txt", "data.level=word", "--no-progress", *TINY, "train.max_steps=2"]
    first = ok(run([*args, "--out", tmp_path / "a"], tmp_path, tmp_path / "cache"))
    second = ok(run([*args, "--out", tmp_path / "b"], tmp_path, tmp_path / "cache"))
    off = ok(run([*args, "--out", tmp_path / "c", "data.cache=false"], tmp_path, tmp_path / "cache"))
    flat = [" ".join(p.stderr.split()) for p in (first, second, off)]   # the log goes to stderr
    assert "(encoded now, cached)" in flat[0]
    assert "(ids from the cache)" in flat[1]
    assert "(encoded now, not cached)" in flat[2]


# -- bad input found by fuzzing the commands (fifth session) -----------------------------------------

def test_out_below_a_regular_file_is_a_usage_error(work):
    f = work / "a_plain_file"
    f.write_text("x")
    r = run(["train", "--data", work / "word.txt", "--out", f / "sub" / "run", "data.level=word", *TINY],
            work, work / "cache")
    assert_usage_error(r, "--out", "is a file")


@pytest.mark.parametrize("command", ["sample", "eval-perplexity", "score"])
def test_device_option_is_checked(work, word_run, command):
    extra = {"sample": ["-l", "3"], "eval-perplexity": ["--data", work / "word_test.txt"],
             "score": ["--input", work / "word_test.txt"]}[command]
    err = assert_usage_error(invoke([command, "-m", word_run, *extra, "--device", "tpu0"]), "--device", "tpu0")
    assert "cuda:N" in err
    if not torch.cuda.is_available():   # the message names the option the user typed, not a config key
        err = assert_usage_error(invoke([command, "-m", word_run, *extra, "--device", "cuda"]), "--device cuda")
        assert "train.device" not in err


@pytest.mark.parametrize("args, needle", [
    (["--seed", str(2 ** 64)], "--seed"),
    (["--seed", str(-(2 ** 63) - 1)], "--seed"),
    (["-l", str(2 ** 31)], "--max-length"),
    (["-n", str(10 ** 23)], "--num-samples"),
])
def test_sample_numbers_out_of_range(word_run, args, needle):
    assert_usage_error(invoke(["sample", "-m", word_run, "-l", "3", *args]), needle)


def test_sample_seed_extremes_work(word_run):
    for seed in (2 ** 64 - 1, -(2 ** 63)):
        r = invoke(["sample", "-m", word_run, "-l", "3", "--seed", str(seed), "--json"])
        assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("item, needle", [
    ("train.momentum=2", "train.momentum"), ("train.momentum=1", "train.momentum"),
    (f"train.seed={2 ** 64}", "train.seed"), ("sample.num_samples=99999999999", "sample.num_samples"),
])
def test_config_ranges_found_by_fuzzing(item, needle):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        build_config(None, [item])


def test_duplicate_yaml_key_is_a_usage_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("model:\n  hidden_size: 64\ntrain:\n  lr: 0.1\nmodel:\n  num_layers: 3\n", encoding="utf-8")
    with pytest.raises(UsageError, match="YAML error in .*line 5, column 1: duplicate key 'model'"):
        build_config(p, [])
    p.write_text("model:\n  hidden_size: 64\n  hidden_size: 32\n", encoding="utf-8")
    with pytest.raises(UsageError, match="duplicate key 'hidden_size'"):
        build_config(p, [])
    # a YAML merge (<<: *anchor) whose keys are then overridden is not a duplicate
    p.write_text("train: &t {lr: 0.1, bptt: 10}\nsample:\n  max_length: 7\n", encoding="utf-8")
    base = build_config(p, [])
    p.write_text("x: &t {lr: 0.1, bptt: 10}\ntrain:\n  <<: *t\n  lr: 0.2\n", encoding="utf-8")
    from rnnlm.config import load_yaml
    assert load_yaml(p)["train"] == {"lr": 0.2, "bptt": 10} and base.train.bptt == 10


def test_plot_out_problems_are_usage_errors(work, word_run):
    assert_usage_error(invoke(["plot", word_run, "--out", work / "no_such_folder" / "x.png"]), "does not exist")
    folder = work / "plot_folder"
    folder.mkdir()
    assert_usage_error(invoke(["plot", word_run, "--out", folder]), "names a folder")
    assert_usage_error(invoke(["plot", word_run, "--out", work / "curves.xyz"]), ".png")
    assert not list(work.glob(".*.tmp.png")) and not list(folder.parent.glob(".plot_folder*"))


def test_plot_run_dir_problems_say_what_is_wrong(work, word_run):
    assert_usage_error(invoke(["plot", work / "no_such_run"]), "not found")
    assert_usage_error(invoke(["plot", work / "word.txt"]), "is a file")
    torn = work / "torn_run"
    torn.mkdir()
    (torn / "metrics.jsonl").write_text("this is not json\n[1, 2]\n", encoding="utf-8")
    assert_usage_error(invoke(["plot", torn]), "not an rnnlm metrics log")


def test_plot_skips_events_without_numbers_and_draws_odd_run_names(work, word_run):
    """A metrics file whose events hold no numbers is a usage error (exit 2), good events beside
    bad ones are drawn; a run directory whose name is not UTF-8 or holds a lone '$' (matplotlib's
    mathematics marker) plots."""
    bad = work / "bad_values"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"event": "train", "step": "x", "tokens": null, "loss": "abc"}\n')
    assert_usage_error(invoke(["plot", bad]), "holds no train or eval events to plot")
    good = '{"event": "train", "step": 5, "tokens": 80, "time": 1.0, "loss": 2.5}\n'
    (bad / "metrics.jsonl").write_text('{"event": "train", "step": 1, "tokens": true, "loss": [1]}\n' + good)
    r = invoke(["plot", bad])
    assert r.exit_code == 0 and (bad / "loss.png").stat().st_size > 0
    for name in (b"odd_\xff_name", b"cost $5"):
        d = Path(os.fsdecode(bytes(work) + b"/" + name))
        d.mkdir()
        (d / "metrics.jsonl").write_text(good)
        r = run(["plot", d], work, work / "cache")  # the real command: its stdout is a byte stream
        assert r.returncode == 0, r.stdout + r.stderr
        assert (d / "loss.png").stat().st_size > 0


def test_eval_and_score_on_a_path_that_is_not_a_regular_file(word_run):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    assert_usage_error(invoke(["eval-perplexity", "-m", word_run, "--data", "/dev/null"]), "not a regular file")
    assert_usage_error(invoke(["score", "-m", word_run, "--input", "/dev/null"]), "not a regular file")


def test_valid_txt_that_is_a_directory_is_not_silently_no_validation(work):
    d = work / "valid_is_dir"
    d.mkdir()
    (d / "train.txt").write_text("the cat sat on the mat\n" * 50)
    (d / "valid.txt").mkdir()
    assert_usage_error(invoke(["train", "--data", d, "--out", work / "never3", *TINY]), "valid.txt is not a regular file")


def test_train_txt_that_is_a_directory(work):
    d = work / "train_is_dir"
    (d / "train.txt").mkdir(parents=True)
    r = run(["train", "--data", d, "--out", work / "never2", *TINY], work, work / "cache")
    assert_usage_error(r, "train.txt", "not a regular file")


def test_adaptive_cutoffs_beyond_the_vocabulary_warn(work):
    r = run(["train", "--data", work / "word.txt", "--out", work / "adaptive_warn", "data.level=word", *TINY,
             "train.max_steps=2", "model.softmax=adaptive", "model.adaptive_cutoffs=[5000,8000]"],
            work, work / "cache")
    ok(r)
    assert "adaptive_cutoffs" in r.stderr and "do not fit" in r.stderr
    # the run records the cutoffs in use, so using the model does not warn again
    saved = yaml.safe_load((work / "adaptive_warn" / "config.yaml").read_text())["model"]["adaptive_cutoffs"]
    assert saved and all(c < 5000 for c in saved)
    for cmd in (["sample", "-m", work / "adaptive_warn", "-l", "5", "--seed", "1"],
                ["eval-perplexity", "-m", work / "adaptive_warn", "-d", work / "word_test.txt"]):
        again = ok(run(cmd, work, work / "cache"))
        assert "do not fit" not in again.stderr


def test_out_of_memory_is_reported_as_such(word_run, monkeypatch):
    from rnnlm.sample import Sampler

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 64000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(Sampler, "generate", no_memory)
    r = invoke(["sample", "-m", word_run, "-l", "3"])
    assert r.exit_code == 1 and "out of memory" in r.stderr and "this is a bug" not in r.stderr


@pytest.mark.parametrize("args, option", [
    (["train", "--config", ""], "--config"), (["train", "--data", ""], "--data"), (["train", "--out", ""], "--out"),
    (["sample", "-m", ""], "--checkpoint"), (["eval-perplexity", "-m", "", "-d", "x.txt"], "--checkpoint"),
    (["eval-perplexity", "-m", "RUN", "-d", ""], "--data"), (["score", "-m", "RUN", "-i", ""], "--input"),
    (["plot", ""], "RUN_DIR"), (["plot", "RUN", "--out", " "], "--out"),
])
def test_an_empty_path_is_named_not_taken_for_the_current_directory(args, option):
    assert_usage_error(invoke(args), option, "is empty")


def test_help_texts_are_not_eaten_by_rich_markup():
    """rich treats [words] in a help text as markup and drops it: the --data help once lost its file names."""
    r = invoke(["train", "--help"])
    assert r.exit_code == 0 and "valid.txt" in " ".join(r.stdout.split())
    for command in COMMANDS:
        params = typer.main.get_command(app).commands[command].params
        assert not [p.help for p in params if p.help and re.search(r"\[[A-Za-z]", p.help)], command


def _deny_reading(monkeypatch, target: Path) -> None:
    """Make opening `target` fail as an unreadable file does (the tests may run as root, where chmod 000
    does not stop reads)."""
    import builtins
    import rnnlm.data
    real_open = builtins.open

    def guarded(file, *a, **k):
        if Path(str(file)).resolve() == target.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(rnnlm.data, "open", guarded, raising=False)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.resolve() == target.resolve() else real_open(self, "rb").read())


def test_unreadable_input_files_are_usage_errors(work, word_run, monkeypatch):
    f = work / "unreadable.txt"
    f.write_text("the cat sat\n", encoding="utf-8")
    _deny_reading(monkeypatch, f)
    for args in (["train", "--data", f, "--out", work / "never3", "data.level=word", *TINY],
                 ["eval-perplexity", "-m", word_run, "-d", f], ["score", "-m", word_run, "-i", f]):
        err = assert_usage_error(invoke(args), "cannot read", "permission denied")
        assert "bug" not in err


def test_empty_data_path_in_the_config_is_named():
    from rnnlm.data import resolve_sources
    cfg = build_config(None, ["data.path=''"])
    with pytest.raises(UsageError, match="data.path is empty"):
        resolve_sources(cfg.data)


def test_plot_out_that_is_only_an_extension_or_a_folder_path(work, word_run):
    assert_usage_error(invoke(["plot", word_run, "--out", work / ".png"]), "give a file name")
    assert_usage_error(invoke(["plot", word_run, "--out", str(work / "new_folder") + "/"]), "names a folder")


def test_duplicate_key_inside_a_merged_mapping(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model:\n  <<: {hidden_size: 32, hidden_size: 16}\n  embedding_size: 8\n", encoding="utf-8")
    with pytest.raises(UsageError, match="duplicate key 'hidden_size'"):
        build_config(p, [])
    p.write_text("a: &a {hidden_size: 32}\nb: &b {num_layers: 3}\nmodel:\n  <<: [*a, *b]\n  hidden_size: 8\n",
                 encoding="utf-8")
    from rnnlm.config import load_yaml
    assert load_yaml(p)["model"] == {"hidden_size": 8, "num_layers": 3}


def test_device_index_must_be_ascii_digits(word_run):
    assert_usage_error(invoke(["sample", "-m", word_run, "-l", "2", "--device", "cuda:\u0663"]), "--device")


@pytest.mark.parametrize("err, code", [(13, 2), (28, 1)])   # EACCES: the user's choice of place; ENOSPC: the disk
def test_plot_write_failure_exit_code_and_no_temp_file_left(work, word_run, monkeypatch, err, code):
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, path, *a, **k: (Path(path).write_bytes(b"partial"),
                                                     (_ for _ in ()).throw(OSError(err, os.strerror(err))))[1])
    r = invoke(["plot", word_run, "--out", work / f"fail{err}.png"])
    assert r.exit_code == code and "cannot write" in r.stderr
    assert not (work / f"fail{err}.png").exists() and not list(work.glob(f".fail{err}*"))


def test_metrics_log_that_is_a_directory_and_an_empty_train_out(work):
    d = work / "odd_run"
    (d / "metrics.jsonl").mkdir(parents=True)
    assert_usage_error(invoke(["plot", d]), "not a regular file")
    r = run(["train", "--data", work / "word.txt", "data.level=word", *TINY, "train.out=''"], work, work / "cache")
    assert_usage_error(r, "train.out is empty")


def test_plot_into_a_read_only_place_is_a_usage_error(work, word_run, monkeypatch):
    """On a read-only file system both the write and the clean-up fail with EROFS: still one message."""
    import matplotlib.figure

    def ro(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, *a, **k: ro())
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: ro())
    r = invoke(["plot", word_run, "--out", work / "ro.png"])
    assert r.exit_code == 2 and "cannot write" in r.stderr and "Read-only file system" in r.stderr


def test_plot_of_a_blow_up_uses_a_log_axis_and_marks_short_series(tmp_path, monkeypatch):
    """A run whose train loss exploded (1e12 nats) for a moment: a log y axis keeps the other
    points readable, and a one-point train series is drawn with a marker so that it shows."""
    import matplotlib.pyplot as plt
    from rnnlm.plot import plot_runs
    run = tmp_path / "boom"
    run.mkdir()
    events = [{"event": "train", "step": 30, "tokens": 100, "time": 1.0, "loss": 7.6e12},
              {"event": "eval", "split": "valid", "step": 30, "tokens": 100, "time": 2.0, "loss": 6.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), real_close(fig)))
    plot_runs([run], tmp_path / "boom.png")
    ax = figs[0].axes[0]
    assert ax.get_yscale() == "log"
    train_line = next(ln for ln in ax.get_lines() if ln.get_label() == "train")
    assert train_line.get_marker() not in (None, "None", "")
    figs.clear()
    events[0]["loss"] = 7.0                                    # an ordinary run: a linear axis
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    plot_runs([run], tmp_path / "calm.png")
    assert figs[0].axes[0].get_yscale() == "linear"


def test_plot_marks_where_weight_averaging_started(tmp_path, monkeypatch):
    """train.averaging=nt: a dotted line at the validation that switched averaging on (the one before
    the first event marked averaged); none in a run without averaging."""
    import matplotlib.pyplot as plt
    from rnnlm.plot import plot_runs
    run = tmp_path / "nt"
    run.mkdir()
    events = [{"event": "eval", "split": "valid", "step": s, "tokens": 10 * s, "time": s, "loss": l}
              for s, l in [(100, 5.0), (200, 4.8), (300, 4.9)]]
    events += [{"event": "eval", "split": "valid", "step": 400, "tokens": 4000, "time": 4, "loss": 4.5,
                "averaged": True}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), real_close(fig)))
    plot_runs([run], tmp_path / "nt.png")
    marks = [ln for ln in figs[0].axes[0].get_lines() if "averaging" in ln.get_label()]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [3000, 3000]
    del events[-1]["averaged"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    figs.clear()
    plot_runs([run], tmp_path / "plain.png")
    assert not [ln for ln in figs[0].axes[0].get_lines() if "averaging" in ln.get_label()]
