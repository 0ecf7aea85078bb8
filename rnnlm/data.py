"""Corpora: read, split, build the vocabulary, encode, and stream BPTT batches.

A corpus is a text file (split contiguously at line boundaries by ``data.split``) or a
directory holding ``train.txt`` and optionally ``valid.txt`` / ``test.txt``. Files are read
and encoded in chunks, so a large corpus never becomes a Python list of tokens; the ids of
each split are a compact numpy array (uint16 when the vocabulary allows).

Batching follows the classic recipe: the training stream (preceded by one ``<eos>``, so the
first token is predicted from the same start context as in evaluation) is cut into
``batch_size`` contiguous columns, and each BPTT window ``x = data[t : t+L]`` has targets
``y = data[t+1 : t+1+L]``; the hidden state is carried from one window to the next.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UsageError
from .text import EOS_ID, Encoder, Tokenizer, Vocab, iter_chunks

SPLITS = ("train", "valid", "test")
_READ_HINT = 1 << 22  # bytes of whole lines read (and decoded) at a time


# -- the embedded default corpus ---------------------------------------------------------

def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("RNNLM_CACHE") or Path.home() / ".cache" / "rnnlm"
    return Path(root)


def default_corpus_path(cache_dir: str | None = None, max_bytes: int = 3_000_000) -> Path:
    """The offline quickstart corpus: the Python standard library's own top-level modules.

    Every Python installation has them (as char-rnn trained on the Linux kernel source). The
    files are concatenated in name order, up to `max_bytes`, into a cached text file.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:
        raise UsageError(f"no Python source files found in {stdlib}; pass --data PATH to train on your own text")
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = cache_root(cache_dir) / "corpora" / f"python{ver}-stdlib-{max_bytes}.txt"
    if out.is_file():
        return out
    parts, size = [], 0
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.replace("\r\n", "\n").strip("\n") + "\n\n"
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(parts), encoding="utf-8")
    os.replace(tmp, out)
    return out


# -- reading -------------------------------------------------------------------------------

@dataclass
class TextSource:
    """A byte range of a file (a whole file, or one split of it)."""

    path: Path
    start: int = 0
    end: int | None = None

    def describe(self) -> str:
        if self.start == 0 and self.end is None:
            return str(self.path)
        return f"{self.path} [bytes {self.start}:{self.end}]"


def read_lines(src: TextSource, encoding: str = "utf-8", errors: str = "strict") -> Iterator[str]:
    """Decoded lines of `src`, read in chunks; invalid text -> UsageError naming line and byte."""
    line_no = 1
    with open(src.path, "rb") as f:
        f.seek(src.start)
        pos = src.start
        first = True
        while src.end is None or pos < src.end:
            want = _READ_HINT if src.end is None else min(_READ_HINT, src.end - pos)
            raw_lines = f.readlines(max(1, want))
            if not raw_lines:
                break
            raw = b"".join(raw_lines)
            if src.end is not None and pos + len(raw) > src.end:
                raw = raw[: src.end - pos]
            if first and raw.startswith(b"\xef\xbb\xbf") and encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
                raw, pos = raw[3:], pos + 3
            first = False
            if b"\x00" in raw and encoding.lower().replace("-", "") in ("utf8", "ascii", "latin1"):
                off = raw.index(b"\x00")
                nul_line = line_no + raw[:off].count(b"\n")
                raise UsageError(f"{src.path}: looks like a binary file (NUL byte at line {nul_line}, "
                                 f"byte offset {pos + off}); rnnlm trains on text files")
            try:
                text = raw.decode(encoding, errors)
            except UnicodeDecodeError as e:
                line = line_no + raw[: e.start].count(b"\n")
                raise UsageError(
                    f"{src.path}: invalid {encoding} at line {line}, byte offset {pos + e.start} "
                    f"({e.reason}); set data.encoding=ENCODING if the file is not {encoding}, "
                    f"or data.errors=replace to replace undecodable bytes") from None
            except LookupError:
                raise UsageError(f"unknown text encoding {encoding!r} (data.encoding)") from None
            line_no += raw.count(b"\n")
            pos += len(raw)
            yield from text.splitlines(keepends=True)


def split_file(path: Path, fractions: list[float]) -> dict[str, TextSource]:
    """Cut one file into contiguous train/valid/test byte ranges at line boundaries."""
    size = path.stat().st_size
    cuts = [0]
    acc = 0.0
    with open(path, "rb") as f:
        for frac in fractions[:-1]:
            acc += frac
            target = int(round(acc * size))
            if target <= cuts[-1]:
                cuts.append(cuts[-1])
                continue
            if target >= size:
                cuts.append(size)
                continue
            f.seek(target - 1)
            f.readline()  # finish the line the cut falls in (a cut right after '\n' stays put)
            cuts.append(min(f.tell(), size))
    cuts.append(size)
    out = {}
    for name, a, b in zip(SPLITS, cuts, cuts[1:]):
        if b > a:
            out[name] = TextSource(path, a, b)
    return out


def resolve_sources(data_cfg) -> tuple[dict[str, TextSource], str]:
    """Map each available split to its text; also return a description of the corpus."""
    if data_cfg.path is None:
        path = default_corpus_path(data_cfg.cache_dir)
        desc = f"embedded default corpus: the Python {sys.version_info.major}.{sys.version_info.minor} standard library"
        return split_file(path, data_cfg.split), desc
    p = Path(data_cfg.path).expanduser()
    if p.is_dir():
        srcs = {}
        for name in SPLITS:
            f = p / f"{name}.txt"
            if f.is_file():
                srcs[name] = TextSource(f)
        if "train" not in srcs:
            raise UsageError(f"data directory {p} has no train.txt (expected train.txt and optionally "
                             f"valid.txt, test.txt)")
        return srcs, str(p)
    if p.is_file():
        if p.stat().st_size == 0:
            raise UsageError(f"data file {p} is empty")
        return split_file(p, data_cfg.split), str(p)
    raise UsageError(f"data path not found: {p} (give a text file, or a directory with train.txt)")


# -- encoding ------------------------------------------------------------------------------

def count_tokens(src: TextSource, tok: Tokenizer, encoding: str, errors: str) -> Counter:
    counter: Counter = Counter()
    for chunk in iter_chunks(read_lines(src, encoding, errors), tok):
        tok.count(tok.clean(chunk), counter)
    return counter


def encode_source(src: TextSource, tok: Tokenizer, vocab: Vocab, encoding: str = "utf-8",
                  errors: str = "strict") -> np.ndarray:
    enc = Encoder(tok, vocab)
    parts = [enc.encode(tok.clean(chunk)) for chunk in iter_chunks(read_lines(src, encoding, errors), tok)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=enc.dtype)


def encode_text(text: str, tok: Tokenizer, vocab: Vocab) -> np.ndarray:
    return Encoder(tok, vocab).encode(tok.clean(text))


@dataclass
class Corpus:
    vocab: Vocab
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    description: str = ""

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    def get(self, name: str) -> np.ndarray | None:
        return self.splits.get(name)


def oov_count(ids: np.ndarray) -> int:
    from .text import UNK_ID
    return int(np.count_nonzero(ids == UNK_ID))


def load_corpus(data_cfg, eos: str, vocab: Vocab | None = None, tokenizer: Tokenizer | None = None) -> Corpus:
    """Read the configured corpus; build the vocabulary from the training split (unless given)."""
    srcs, desc = resolve_sources(data_cfg)
    tok = tokenizer or Tokenizer.from_config(data_cfg, eos)
    if vocab is None:
        counter = count_tokens(srcs["train"], tok, data_cfg.encoding, data_cfg.errors)
        if not counter:
            raise UsageError(f"training text {srcs['train'].describe()} has no tokens")
        vocab = Vocab.build(counter, data_cfg.min_freq, data_cfg.max_vocab)
    splits = {}
    for name, src in srcs.items():
        ids = encode_source(src, tok, vocab, data_cfg.encoding, data_cfg.errors)
        if len(ids) == 0:
            if name == "train":
                raise UsageError(f"training text {src.describe()} has no tokens")
            raise UsageError(f"{name} text {src.describe()} tokenizes to nothing; remove it or give it text")
        splits[name] = ids
    return Corpus(vocab, tok, splits, desc)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- batching ------------------------------------------------------------------------------

def with_start(ids: np.ndarray) -> np.ndarray:
    """Prepend the start context (<eos>): the first token is predicted from it."""
    return np.concatenate([np.array([EOS_ID], dtype=ids.dtype), ids])


def batchify(ids: np.ndarray, batch_size: int) -> torch.Tensor:
    """Lay a 1-D id stream out as `batch_size` contiguous columns: (T, B) int32.

    Column b holds ids[b*T : (b+1)*T]; the tail that does not fill a row is dropped.
    Ids stay compact (int32) and are widened to int64 one window at a time.
    """
    n = len(ids) // batch_size
    if n < 2:
        raise UsageError(f"corpus too small: {len(ids)} tokens cannot fill {batch_size} columns of at least 2 tokens; "
                         f"lower train.batch_size or give more text")
    arr = np.ascontiguousarray(ids[: n * batch_size].reshape(batch_size, n).T.astype(np.int32))
    return torch.from_numpy(arr)  # (T, B)


def num_windows(data: torch.Tensor, bptt: int) -> int:
    """Windows in one pass over `data` (T, B): every target position covered once."""
    return (data.size(0) - 2) // bptt + 1


def get_window(data: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window i: inputs (L, B) and targets (L, B), the inputs shifted by one, as int64."""
    start = i * bptt
    length = min(bptt, data.size(0) - 1 - start)
    x = data[start: start + length]
    y = data[start + 1: start + 1 + length]
    return x.long(), y.long()
