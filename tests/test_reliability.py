"""Nothing is lost: SIGKILL at random moments, a full disk, two trainers on one run, Ctrl-C / SIGTERM.

Training runs as real processes (`python -m rnnlm train ...`) that the tests kill, signal or
starve of disk space; every check afterwards goes through the public loaders and the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rnnlm import checkpoint as ck
from rnnlm.checkpoint import LAST, load_checkpoint, load_model
from rnnlm.cli import app
from rnnlm.errors import RunError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

TINY = ["model.hidden_size=32", "model.embedding_size=16", "model.num_layers=1", "train.batch_size=4",
        "train.bptt=16", "train.log_every=5", "train.device=cpu", "data.level=word"]
WORDS = "the a cat dog bird sat ran flew on under over mat rug tree big small red old".split()


def corpus(path: Path, n_lines: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
                              for _ in range(n_lines)) + "\n", encoding="utf-8")
    return path


def cli_env(tmp_path: Path) -> dict:
    # one intra-op thread: these models are tiny, and the tests share two cores with each other
    env = dict(os.environ, RNNLM_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore", COLUMNS="200",
               OMP_NUM_THREADS="1")
    env.pop("RNNLM_DEBUG", None)
    return env


def start(args: list, tmp_path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rnnlm", *[str(a) for a in args]], cwd=tmp_path,
                            env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(args: list, tmp_path: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnlm", *[str(a) for a in args]], cwd=tmp_path,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout, **kw)


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (exit {proc.returncode}) before {what}\n{out}\n{err}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def saved_step(run_dir: Path) -> int:
    return int(load_checkpoint(run_dir / LAST)["step"])


def metrics(run_dir: Path) -> tuple[list[dict], int]:
    """The parsed events and the number of lines that are not JSON (torn by a kill)."""
    events, torn = [], 0
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                torn += 1
    return events, torn


def temp_files(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def invoke(args: list):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- (a) SIGKILL at random moments -----------------------------------------------------------------

def test_sigkill_at_random_moments_then_resume(tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    info = f"(random seed {seed})"
    data = corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "run"
    # frequent checkpoints: last.pt after every step, an evaluation (best.pt + last.pt) every 3 steps
    args = ["train", "--data", data, "--out", run_dir, *TINY, "train.save_every=1", "train.eval_every=3",
            "train.max_steps=100000", "train.epochs=1000", "train.eval_max_tokens=200"]
    t0 = time.monotonic()
    kills, steps = 0, [0]
    proc = start(args, tmp_path)
    # the first kill only once a checkpoint exists (see test_kill_before_the_first_checkpoint)
    wait_for(lambda: (run_dir / LAST).exists(), 60, proc, "the first checkpoint")
    while True:
        time.sleep(rng.uniform(0.5, 4.0))
        assert proc.poll() is None, f"training ended by itself {info}: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
        # after every kill: the checkpoints load, and progress never goes backwards
        step = saved_step(run_dir)
        assert step >= steps[-1], info
        steps.append(step)
        lm = load_model(run_dir)
        assert len(lm.vocab) > 2
        if kills == 3 or time.monotonic() - t0 > 35:
            break
        proc = start(["train", "--resume", "--out", run_dir], tmp_path)
    assert kills >= 2
    # the run continues from where the last checkpoint left off, and finishes
    target = steps[-1] + 12
    done = run(["train", "--resume", "--out", run_dir, f"train.max_steps={target}"], tmp_path)
    assert done.returncode == 0, f"{info}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert f"continuing at step {steps[-1]}" in done.stderr, done.stderr
    events, torn = metrics(run_dir)
    assert torn <= kills, info  # at most the line being written at each kill
    assert events[-1]["event"] == "end" and events[-1]["step"] == target
    assert saved_step(run_dir) == target
    assert temp_files(run_dir) == [], info  # temp files of killed writers are cleaned up
    assert not (run_dir / ".lock").exists()
    assert time.monotonic() - t0 < 60


def test_kill_before_the_first_checkpoint_can_be_restarted(tmp_path):
    data = corpus(tmp_path / "corpus.txt", n_lines=100)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # what a SIGKILL during start-up leaves behind: the resolved config and vocabulary, no checkpoint
    (run_dir / "config.yaml").write_text("name: corpus\n")
    (run_dir / "vocab.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("")
    args = ["train", "--data", data, "--out", run_dir, *TINY, "train.max_steps=2"]
    results = [invoke(args).exit_code, invoke(["train", "--resume", "--out", run_dir, "train.max_steps=2"]).exit_code]
    assert 0 in results


# -- (b) disk full / unwritable run directory ------------------------------------------------------

@pytest.fixture()
def trained(tmp_path) -> Path:
    """A finished tiny run (in-process, for speed)."""
    run_dir = tmp_path / "run"
    r = invoke(["train", "--data", corpus(tmp_path / "corpus.txt", n_lines=200), "--out", run_dir, *TINY,
                "train.max_steps=6", "train.eval_every=3"])
    assert r.exit_code == 0, r.stderr
    return run_dir


def test_disk_full_during_save_in_process(trained, monkeypatch):
    from rnnlm.config import build_config
    from rnnlm.train import Trainer

    before = (trained / LAST).read_bytes()
    calls = []

    def full(path, data):
        calls.append(Path(path).name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "atomic_write_bytes", full)
    trainer = Trainer(build_config(overrides=["train.max_steps=9"]), trained, resume=True)
    with pytest.raises(RunError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "No space left on device" in msg and "previous checkpoint is intact" in msg
    ckpts = [c for c in calls if c != "config.yaml"]  # (the resume's config.yaml update only warns)
    assert ckpts and ckpts[0] in ("best.pt", "last.pt")
    monkeypatch.undo()
    assert (trained / LAST).read_bytes() == before and temp_files(trained) == []
    assert saved_step(trained) == 6
    assert not (trained / ".lock").exists()  # the lock is released on failure too


def test_disk_full_during_save_through_the_cli(trained, monkeypatch):
    before = (trained / LAST).read_bytes()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "atomic_write_bytes", full)
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=9"])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert "could not write checkpoint" in r.stderr and "No space left on device" in r.stderr
    assert (trained / LAST).read_bytes() == before


def test_file_size_limit_in_a_real_process(trained, tmp_path):
    """A real failing write (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) in a real process."""
    before = (trained / LAST).read_bytes()
    limit = len(before) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run(["train", "--resume", "--out", trained, "train.max_steps=9"], tmp_path, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "could not write checkpoint" in err and "File too large" in err and "intact" in err
    assert (trained / LAST).read_bytes() == before and temp_files(trained) == []
    assert not (trained / ".lock").exists()


# -- (c) two trainers, one run directory; (d) SIGTERM / SIGINT --------------------------------------

def long_run(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / name
    data = corpus(tmp_path / "corpus.txt")
    proc = start(["train", "--data", data, "--out", run_dir, *TINY, "train.max_steps=100000", "train.epochs=1000",
                  "train.eval_every=10", "train.eval_max_tokens=200"], tmp_path)
    wait_for(lambda: (run_dir / LAST).exists() and (run_dir / ".lock").exists(), 60, proc, "a running trainer")
    return proc, run_dir


def stop_with(proc: subprocess.Popen, sig: int, run_dir: Path) -> str:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + int(sig), f"exit {proc.returncode}\n{out}\n{err}"  # 130 / 143, like a shell
    assert "Traceback" not in err
    err = " ".join(err.split())
    assert f"rnnlm train --resume --out {run_dir}" in err  # says how to resume
    return err


def test_second_trainer_refused_then_sigterm_then_resume(tmp_path):
    proc, run_dir = long_run(tmp_path, "run")
    try:
        pid = int((run_dir / ".lock").read_text().strip())
        assert pid == proc.pid
        second = run(["train", "--resume", "--out", run_dir], tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        err = " ".join(second.stderr.split())
        assert "in use" in err and str(proc.pid) in err
        fresh = invoke(["train", "--data", tmp_path / "corpus.txt", "--out", run_dir, *TINY])
        assert fresh.exit_code == 2 and "Traceback" not in fresh.stderr
        assert proc.poll() is None  # the first one is unharmed
    finally:
        if proc.poll() is None:
            err = stop_with(proc, signal.SIGTERM, run_dir)
    assert "SIGTERM" in err
    step = saved_step(run_dir)
    events, torn = metrics(run_dir)
    assert torn == 0 and events[-1]["event"] == "end" and events[-1]["step"] == step
    assert not (run_dir / ".lock").exists()
    done = invoke(["train", "--resume", "--out", run_dir, f"train.max_steps={step + 5}"])
    assert done.exit_code == 0, done.stderr
    assert saved_step(run_dir) == step + 5


def test_sigint_finishes_the_step_and_saves(tmp_path):
    proc, run_dir = long_run(tmp_path, "run_int")
    time.sleep(random.uniform(0.2, 1.0))
    err = stop_with(proc, signal.SIGINT, run_dir)
    assert "SIGINT" in err
    step = saved_step(run_dir)
    ckpt = load_checkpoint(run_dir / LAST)
    assert ckpt["trainer"]["window"] >= 0 and step > 0
    done = invoke(["train", "--resume", "--out", run_dir, f"train.max_steps={step + 3}"])
    assert done.exit_code == 0, done.stderr
    assert f"continuing at step {step}" in " ".join(done.stderr.split())
    assert saved_step(run_dir) == step + 3


def test_stale_lock_of_a_dead_process_is_taken_over(trained):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (trained / ".lock").write_text(str(dead.pid))
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=8"])
    assert r.exit_code == 0, r.stderr
    assert saved_step(trained) == 8 and not (trained / ".lock").exists()
    (trained / ".lock").write_text("garbage")  # an unreadable lock counts as stale too
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=9"])
    assert r.exit_code == 0, r.stderr


def test_lock_of_a_live_process_is_respected(trained):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (trained / ".lock").write_text(str(holder.pid))
        r = invoke(["train", "--resume", "--out", trained, "train.max_steps=8"])
        assert r.exit_code == 2 and "in use" in r.stderr and str(holder.pid) in r.stderr
        assert saved_step(trained) == 6
        assert (trained / ".lock").read_text() == str(holder.pid)  # not stolen
    finally:
        holder.kill()
        holder.wait()


# -- resume: only its own run, only when there is something to do, one event per step ----------

def test_resume_refuses_a_weights_only_last_pt(trained):
    (trained / LAST).write_bytes((trained / "best.pt").read_bytes())
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=9"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "holds weights only" in " ".join(r.stderr.split())


def test_resume_refuses_a_last_pt_copied_from_another_run(trained, tmp_path):
    other = tmp_path / "other"
    r = invoke(["train", "--data", corpus(tmp_path / "c2.txt", n_lines=200), "--out", other, *TINY,
                "train.max_steps=4", "data.level=char"])
    assert r.exit_code == 0, r.stderr
    best = (trained / "best.pt").read_bytes()
    (trained / LAST).write_bytes((other / LAST).read_bytes())
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=9"])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and "does not belong to this run directory" in err and "data" in err
    assert (trained / "best.pt").read_bytes() == best           # nothing of the run was touched


def test_resuming_a_finished_run_changes_nothing(trained):
    before = {f: (trained / f).read_bytes() for f in (LAST, "best.pt", "metrics.jsonl", "config.yaml")}
    r = invoke(["train", "--resume", "--out", trained, "train.lr=0.5"])   # a train.* change alone trains nothing
    assert r.exit_code == 0, r.stderr
    assert "nothing to do" in " ".join(r.stderr.split()) and "max_steps" in r.stderr
    assert {f: (trained / f).read_bytes() for f in before} == before
    assert saved_step(trained) == 6


def test_resume_drops_the_events_logged_after_the_checkpoint(trained):
    """Events past last.pt's step (a crash after a log line, a save that failed) and a torn line
    are dropped on resume: every step is logged once."""
    log = trained / "metrics.jsonl"
    events, _ = metrics(trained)
    ghost = {**[e for e in events if e["event"] == "train"][-1], "step": 8, "loss": 99.0}
    log.write_text(log.read_text() + json.dumps(ghost) + "\n" + '{"event": "train", "st', encoding="utf-8")
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=9", "train.log_every=1"])
    assert r.exit_code == 0, r.stderr
    events, torn = metrics(trained)
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert torn == 0 and 99.0 not in [e.get("loss") for e in events]
    assert train_steps == sorted(set(train_steps)) and train_steps[-3:] == [7, 8, 9]


def test_read_only_run_directory_is_a_usage_error(trained, monkeypatch):
    from rnnlm.train import RunLock
    real_open = os.open

    def ro_open(path, flags, *a):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", ro_open)
    r = invoke(["train", "--resume", "--out", trained, "train.max_steps=9"])
    assert r.exit_code == 2 and "Read-only file system" in r.stderr and "Traceback" not in r.stderr
    assert not RunLock(trained).held


def test_config_from_a_pipe_and_data_from_a_pipe(tmp_path):
    data = corpus(tmp_path / "c.txt", n_lines=200)
    r = invoke(["train", "--config", "/dev/null", "--print-config", "--data", data])
    assert r.exit_code == 0 and "hidden_size: 256" in r.stdout    # /dev/null: an empty config, the defaults
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    r = invoke(["train", "--data", fifo, "--out", tmp_path / "f", *TINY])
    assert r.exit_code == 2 and "not a regular file" in r.stderr


def test_resume_on_changed_training_text_warns(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    corpus(data / "train.txt", n_lines=200)
    run_dir = tmp_path / "r"
    r = invoke(["train", "--data", data, "--out", run_dir, *TINY, "train.max_steps=4"])
    assert r.exit_code == 0, r.stderr
    r = invoke(["train", "--resume", "--out", run_dir, "train.max_steps=6"])
    assert r.exit_code == 0 and "differs" not in r.stderr           # the same text: no warning
    corpus(data / "train.txt", n_lines=150, seed=3)
    r = invoke(["train", "--resume", "--out", run_dir, "train.max_steps=8"])
    assert r.exit_code == 0, r.stderr
    assert "the training text differs from the one this run was trained on" in " ".join(r.stderr.split())
    assert saved_step(run_dir) == 8


def test_resume_from_another_folder_with_a_relative_data_path(tmp_path, monkeypatch):
    """A run trained on a relative data path resumes from elsewhere when --data says where the text
    is now (data.path is the one data.* key that may change on resume); without it, the message
    says so."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    corpus(tmp_path / "a" / "c.txt", n_lines=200)
    monkeypatch.chdir(tmp_path / "a")
    r = invoke(["train", "--data", "c.txt", "--out", tmp_path / "r", *TINY, "train.max_steps=4"])
    assert r.exit_code == 0, r.stderr
    monkeypatch.chdir(tmp_path / "b")
    r = invoke(["train", "--resume", "--out", tmp_path / "r", "train.max_steps=6"])
    assert r.exit_code == 2 and "--resume --data PATH" in " ".join(r.stderr.split())
    r = invoke(["train", "--resume", "--out", tmp_path / "r", "--data", tmp_path / "a" / "c.txt", "train.max_steps=6"])
    assert r.exit_code == 0, r.stderr
    assert "differs" not in r.stderr and saved_step(tmp_path / "r") == 6
    import yaml
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())   # the config in force now
    assert saved["train"]["max_steps"] == 6 and saved["data"]["path"] == str(tmp_path / "a" / "c.txt")
    r = invoke(["train", "--resume", "--out", tmp_path / "r", "model.hidden_size=64", "train.max_steps=7"])
    assert r.exit_code == 2 and "cannot change model" in " ".join(r.stderr.split())


# -- is the holder of a lock or a temp file alive? ----------------------------------------------

def test_pid_alive_tells_live_from_dead_processes():
    assert ck.pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                    # exited and reaped: its pid names no process now
    assert not ck.pid_alive(proc.pid)
    assert not ck.pid_alive(0) and not ck.pid_alive(-5)


@pytest.mark.parametrize("opened,error,got_code,code,alive", [
    (True, 0, True, 259, True),                    # STILL_ACTIVE
    (True, 0, True, 0, False),                     # exited with code 0
    (True, 0, False, 0, True),                     # exit code unreadable: keep its lock
    (False, 5, None, None, True),                  # exists, but may not be opened (access denied)
    (False, 87, None, None, False),                # no such process (invalid parameter)
])
def test_pid_alive_on_windows_asks_for_the_exit_code(opened, error, got_code, code, alive):
    """On Windows os.kill(pid, 0) would send CTRL_C_EVENT or kill the process: the check goes through
    OpenProcess / GetExitCodeProcess instead (a stand-in for kernel32 here), and closes its handle."""
    import ctypes
    closed = []

    class Kernel32:
        def OpenProcess(self, access, inherit, pid):
            assert access == 0x1000 and pid == 4321
            return 77 if opened else 0

        def GetExitCodeProcess(self, handle, ref):
            assert handle == 77
            ref._obj.value = code or 0
            return got_code

        def CloseHandle(self, handle):
            closed.append(handle)

    class Ctypes:
        c_ulong, byref = ctypes.c_ulong, staticmethod(ctypes.byref)

        @staticmethod
        def get_last_error():
            return error

    assert ck._pid_alive_windows(4321, Kernel32(), Ctypes) is alive
    assert closed == ([77] if opened else [])
