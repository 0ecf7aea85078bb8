"""Shared test fixtures: an isolated rnnlm cache and a helper that writes small corpora."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Point RNNLM_CACHE at a temporary folder for the whole session, so tests never read or
    write the user's ~/.cache/rnnlm (subprocesses inherit it)."""
    old = os.environ.get("RNNLM_CACHE")
    os.environ["RNNLM_CACHE"] = str(tmp_path_factory.mktemp("rnnlm-cache"))
    yield
    if old is None:
        os.environ.pop("RNNLM_CACHE", None)
    else:
        os.environ["RNNLM_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny models: one intra-op thread is fastest, and on a busy 2-core machine two
    threads waiting on each other can be up to 10x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty RNNLM_CACHE for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("RNNLM_CACHE", str(d))
    return d


@pytest.fixture
def write_corpus(tmp_path):
    """write_corpus(name, text_or_bytes, **splits) -> Path.

    With only `text`, writes one file `name`; with keyword splits (train=..., valid=...), writes
    a directory `name` holding train.txt etc. Text is written as UTF-8 bytes, untranslated.
    """
    def write(name: str, text: str | bytes | None = None, **splits: str | bytes) -> Path:
        def put(path: Path, content: str | bytes) -> None:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))

        if splits:
            d = tmp_path / name
            d.mkdir(parents=True, exist_ok=True)
            for split, content in splits.items():
                put(d / f"{split}.txt", content)
            return d
        p = tmp_path / name
        put(p, text or "")
        return p

    return write


WORDS = "the cat dog sat on a mat and ran far away quickly slowly big small red".split()


def _word_lines(n: int, seed: int, most: int) -> str:
    """n lines of 3..`most` words drawn from WORDS, reproducibly."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, most))) + "\n" for _ in range(n))


@pytest.fixture()
def word_corpus(tmp_path, monkeypatch) -> Path:
    """1,500 lines of 3-10 words drawn from 16 (a fixed seed), with a private RNNLM_CACHE."""
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "c.txt"
    p.write_text(_word_lines(1500, 0, 10))
    return p


@pytest.fixture()
def tiny_word_corpus(tmp_path, monkeypatch) -> Path:
    """90 lines of 3-9 words (about 580 tokens: a few windows an epoch), with a private RNNLM_CACHE."""
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "c.txt"
    p.write_text(_word_lines(90, 1, 9))
    return p
