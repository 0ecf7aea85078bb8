"""Checkpoints: atomic writes, safe loads, and a clear UsageError for every kind of bad file."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from rnnlm import checkpoint as ck
from rnnlm.checkpoint import (BEST, FORMAT_VERSION, LAST, atomic_write_bytes, load_checkpoint, load_model,
                              resolve_checkpoint, save_checkpoint)
from rnnlm.config import build_config
from rnnlm.errors import RunError, UsageError
from rnnlm.models import RNNLM
from rnnlm.text import Tokenizer, Vocab

TINY = ["model.hidden_size=8", "model.embedding_size=4", "model.num_layers=1"]


def make_payload(words: str = "a b c d e f", overrides: list[str] | None = None) -> dict:
    cfg = build_config(overrides=TINY + ["data.level=word"] + (overrides or []))
    tok = Tokenizer.from_config(cfg.data, cfg.resolved_eos())
    vocab = Vocab.build(Counter(words.split()))
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cfg.model)
    return {"model": model.state_dict(), "config": {"name": cfg.name, **cfg.to_dict()},
            "vocab": vocab.to_dict(tok), "step": 3}


@pytest.fixture()
def good(tmp_path) -> Path:
    p = tmp_path / "model.pt"
    save_checkpoint(p, make_payload())
    return p


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


# -- round trip ------------------------------------------------------------------------------

def test_save_and_load_round_trip(good):
    data = load_checkpoint(good)
    assert data["format_version"] == FORMAT_VERSION and data["step"] == 3 and data["path"] == str(good)
    lm = load_model(good)
    assert len(lm.vocab) == 8 and lm.config.model.hidden_size == 8 and lm.tokenizer.level == "word"
    assert not lm.model.training
    for k, v in make_payload()["model"].items():
        assert torch.equal(lm.model.state_dict()[k], v)


def test_checkpoint_file_is_not_private(good):
    """mkstemp makes 0600 files; a checkpoint gets ordinary permissions (or keeps the old file's)."""
    umask = os.umask(0)
    os.umask(umask)
    assert good.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(good, 0o640)
    save_checkpoint(good, make_payload())
    assert good.stat().st_mode & 0o777 == 0o640


# -- atomic writes -----------------------------------------------------------------------------

def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch, where):
    p = tmp_path / LAST
    save_checkpoint(p, make_payload())
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(ck.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(ck.os, "fsync", boom)
    else:
        real_fdopen = os.fdopen

        class Failing(io.RawIOBase):
            def __init__(self, fd, *a, **k):
                self.f = real_fdopen(fd, "wb")

            def write(self, b):  # half of it reaches the disk, then the disk is full
                self.f.write(bytes(b[: len(b) // 2]))
                self.f.flush()
                boom()

            def close(self):
                self.f.close()
                super().close()

        monkeypatch.setattr(ck.os, "fdopen", Failing)
    with pytest.raises(RunError) as e:
        save_checkpoint(p, make_payload(words="x y z"))
    msg = str(e.value)
    assert "No space left on device" in msg and "previous checkpoint is intact" in msg and str(p) in msg
    monkeypatch.undo()
    assert p.read_bytes() == before and leftovers(tmp_path) == []
    assert len(load_model(p).vocab) == 8


def test_interrupt_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / LAST
    atomic_write_bytes(p, b"old")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_write_into_missing_directory_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="could not write checkpoint"):
        save_checkpoint(tmp_path / "gone" / LAST, make_payload())


def test_temp_files_of_dead_writers_are_cleaned_up(tmp_path):
    p = tmp_path / LAST
    dead = _dead_pid()
    (tmp_path / f".{LAST}.{dead}.abc123.tmp").write_bytes(b"torn")      # SIGKILLed mid-write
    (tmp_path / f".{LAST}.{os.getppid()}.abc123.tmp").write_bytes(b"x")  # a live writer: left alone
    (tmp_path / f".{BEST}.{dead}.abc123.tmp").write_bytes(b"other")      # another file's temp: left alone
    atomic_write_bytes(p, b"new")
    assert leftovers(tmp_path) == sorted([f".{LAST}.{os.getppid()}.abc123.tmp", f".{BEST}.{dead}.abc123.tmp"])


def _dead_pid() -> int:
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- resolving a run directory -----------------------------------------------------------------

def test_resolve_checkpoint_prefers_best_then_last(tmp_path):
    with pytest.raises(UsageError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / LAST).write_bytes(b"x")
    assert resolve_checkpoint(tmp_path) == tmp_path / LAST
    (tmp_path / BEST).write_bytes(b"x")
    assert resolve_checkpoint(tmp_path) == tmp_path / BEST
    assert resolve_checkpoint(tmp_path / LAST) == tmp_path / LAST
    assert resolve_checkpoint(str(tmp_path)) == tmp_path / BEST


def test_run_directory_loads_its_best(tmp_path):
    save_checkpoint(tmp_path / LAST, make_payload(words="a b"))
    save_checkpoint(tmp_path / BEST, make_payload(words="a b c d e f g h"))
    assert len(load_model(tmp_path).vocab) == 10
    (tmp_path / BEST).unlink()
    assert len(load_model(tmp_path).vocab) == 4


# -- bad files -> UsageError with a clear message -----------------------------------------------

def test_missing(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_empty(tmp_path):
    p = tmp_path / "e.pt"
    p.write_bytes(b"")
    with pytest.raises(UsageError, match="empty"):
        load_checkpoint(p)


def test_an_unreadable_checkpoint_names_what_to_use_instead(tmp_path):
    """best.pt unreadable: use last.pt; last.pt unreadable: best.pt serves sampling and evaluation but
    holds no trainer state, so a resume must start again (never 'resume from best.pt')."""
    for name, needles in ((BEST, ["Use the run's last.pt"]),
                          (LAST, ["can use the run's best.pt", "training must start again"])):
        p = tmp_path / name
        p.write_bytes(b"")
        with pytest.raises(UsageError) as e:
            load_checkpoint(p)
        assert all(n in str(e.value) for n in needles), str(e.value)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.5, 0.9, 0.999])
def test_truncated(good, fraction):
    data = good.read_bytes()
    good.write_bytes(data[: max(5, int(len(data) * fraction))])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_model(good)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    rng = random.Random(seed)
    p = tmp_path / "r.pt"
    head = b"PK\x03\x04" if seed % 2 else b""  # also garbage that starts like a zip
    p.write_bytes(head + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 20000))))
    with pytest.raises(UsageError) as e:
        load_model(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("seed", range(8))
def test_damaged_bytes_inside_a_real_checkpoint(good, seed):
    """Flipped bytes: either the file still loads (an unimportant byte) or a UsageError, nothing else."""
    rng = random.Random(seed)
    data = bytearray(good.read_bytes())
    for _ in range(8):
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    good.write_bytes(bytes(data))
    try:
        load_model(good)
    except UsageError:
        pass


def test_other_zip_or_torch_files_are_not_checkpoints(tmp_path):
    p = tmp_path / "z.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(UsageError):
        load_checkpoint(p)
    torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(UsageError, match="not an rnnlm checkpoint"):
        load_checkpoint(p)
    torch.save(torch.zeros(3), p)
    with pytest.raises(UsageError, match="not an rnnlm checkpoint"):
        load_checkpoint(p)


def test_newer_format_version(tmp_path):
    p = tmp_path / "new.pt"
    payload = make_payload()
    torch.save({"format": ck.FORMAT, **payload, "format_version": FORMAT_VERSION + 1}, p)
    with pytest.raises(UsageError) as e:
        load_checkpoint(p)
    assert f"format version {FORMAT_VERSION + 1}" in str(e.value) and "upgrade rnnlm" in str(e.value)


@pytest.mark.parametrize("missing", ["model", "config", "vocab"])
def test_incomplete_checkpoint(tmp_path, missing):
    p = tmp_path / "inc.pt"
    payload = {"format": ck.FORMAT, "format_version": FORMAT_VERSION, **make_payload()}
    del payload[missing]
    torch.save(payload, p)
    with pytest.raises(UsageError, match=f"'{missing}'"):
        load_checkpoint(p)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _EvilEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("kind", ["torch_zip", "torch_zip_eval", "plain_pickle_p2", "plain_pickle_p5",
                                  "legacy_torch"])
def test_malicious_pickle_does_not_run(tmp_path, kind):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    payload = {"format": ck.FORMAT, "format_version": FORMAT_VERSION, **make_payload()}
    if kind == "torch_zip":
        payload["model"] = {"weight": _Evil(marker)}
        torch.save(payload, p)
    elif kind == "torch_zip_eval":
        payload["vocab"] = _EvilEval(marker)
        torch.save(payload, p)
    elif kind == "legacy_torch":
        torch.save({**payload, "x": _Evil(marker)}, p, _use_new_zipfile_serialization=False)
    else:
        p.write_bytes(pickle.dumps({**payload, "x": _Evil(marker)}, protocol=2 if kind.endswith("p2") else 5))
    # sanity: the file really is dangerous when unpickled without protection
    if kind.startswith("plain"):
        assert b"system" in p.read_bytes()
    with pytest.raises(UsageError) as e:
        load_model(p)
    assert not marker.exists(), "loading a checkpoint ran code from it"
    assert str(p) in str(e.value)
    if kind.startswith("torch_zip"):
        assert "refusing to load" in str(e.value) and "could run code" in str(e.value)
        # only what was refused, not torch's advice to allow-list it (nor a sentence cut in the middle)
        assert "add_safe_globals" not in str(e.value) and "Please use" not in str(e.value)


def test_the_malicious_file_would_have_run_without_protection(tmp_path):
    """Guards the test above: the same file, unpickled unsafely, does create the marker."""
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"x": _Evil(marker)}, p)
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_vocabulary_that_does_not_match_the_weights(tmp_path):
    p = tmp_path / "mismatch.pt"
    payload = make_payload(words="a b c d e f")
    payload["vocab"] = make_payload(words="a b c d e f g h i j")["vocab"]
    save_checkpoint(p, payload)
    with pytest.raises(UsageError) as e:
        load_model(p)
    assert "do not match" in str(e.value) and "12 tokens" in str(e.value)


def test_config_that_does_not_match_the_weights(tmp_path):
    p = tmp_path / "mismatch.pt"
    payload = make_payload()
    payload["config"] = make_payload(overrides=["model.hidden_size=16"])["config"]
    save_checkpoint(p, payload)
    with pytest.raises(UsageError, match="do not match"):
        load_model(p)


@pytest.mark.parametrize("damage", ["bad_config_value", "unknown_config_key", "vocab_not_dict", "vocab_no_tokens",
                                    "vocab_no_specials", "tokenizer_bad_keys", "tokenizer_bad_level",
                                    "vocab_newer", "model_not_dict", "model_wrong_keys", "format_version_str"])
def test_malformed_contents(tmp_path, damage):
    p = tmp_path / "bad.pt"
    payload = make_payload()
    if damage == "bad_config_value":
        payload["config"]["model"]["hidden_size"] = -3
    elif damage == "unknown_config_key":
        payload["config"]["model"]["hiden"] = 3
    elif damage == "vocab_not_dict":
        payload["vocab"] = ["a", "b"]
    elif damage == "vocab_no_tokens":
        del payload["vocab"]["tokens"]
    elif damage == "vocab_no_specials":
        payload["vocab"]["tokens"] = ["x", "y"] + payload["vocab"]["tokens"][2:]
    elif damage == "tokenizer_bad_keys":
        payload["vocab"]["tokenizer"] = {"levels": "word"}
    elif damage == "tokenizer_bad_level":
        payload["vocab"]["tokenizer"]["level"] = "byte"
    elif damage == "vocab_newer":
        payload["vocab"]["version"] = 99
    elif damage == "model_not_dict":
        payload["model"] = [torch.zeros(2)]
    elif damage == "model_wrong_keys":
        payload["model"] = {"w": torch.zeros(2)}
    elif damage == "format_version_str":
        payload["format_version"] = "1"
    torch.save({"format": ck.FORMAT, "format_version": FORMAT_VERSION, **payload}, p)
    with pytest.raises(UsageError) as e:
        load_model(p)
    assert str(p) in str(e.value)


def test_loading_never_warns(good, recwarn):
    load_model(good)
    assert not [w for w in recwarn if "weights_only" in str(w.message) or "pickle" in str(w.message)]


def test_failed_first_save_does_not_claim_a_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import rnnlm.checkpoint as ck

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "atomic_write_bytes", full)
    with pytest.raises(RunError) as e:
        save_checkpoint(tmp_path / "best.pt", make_payload(words="x y z"))
    msg = str(e.value)
    assert "No space left on device" in msg and "nothing was written in its place" in msg
    assert "previous checkpoint" not in msg and not (tmp_path / "best.pt").exists()


def test_load_model_checks_the_device_name_first(tmp_path):
    from rnnlm.checkpoint import load_model
    with pytest.raises(UsageError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        load_model(tmp_path / "nowhere.pt", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            load_model(tmp_path / "nowhere.pt", device="cuda")


def test_runs_latest_means_the_newest_run_where_no_link_could_be_made(tmp_path):
    """runs/latest is a symbolic link the trainer keeps; where none could be made (Windows without
    the right to), resolving it picks the run directory whose checkpoint was written last."""
    import os
    from rnnlm.checkpoint import resolve_checkpoint
    runs = tmp_path / "runs"
    older, newer, empty = runs / "default-20260101-000000", runs / "mine-20260102-000000", runs / "nothing"
    for d in (older, newer, empty):
        d.mkdir(parents=True)
    (older / "last.pt").write_bytes(b"x")
    (newer / "best.pt").write_bytes(b"x")
    os.utime(older / "last.pt", (1_000_000, 1_000_000))
    os.utime(newer / "best.pt", (2_000_000, 2_000_000))
    assert resolve_checkpoint(runs / "latest") == newer / "best.pt"
    os.utime(older / "last.pt", (3_000_000, 3_000_000))
    assert resolve_checkpoint(runs / "latest") == older / "last.pt"
    (runs / "latest").symlink_to(newer.name)                     # the link, where there is one, wins
    assert resolve_checkpoint(runs / "latest").resolve() == (newer / "best.pt").resolve()
    with pytest.raises(UsageError, match="not found"):
        resolve_checkpoint(tmp_path / "elsewhere" / "latest")
