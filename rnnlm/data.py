"""Corpora: read, split, build the vocabulary, encode (cached on disk), and stream BPTT batches.

A corpus is a text file (split contiguously at line boundaries by ``data.split``) or a
directory holding ``train.txt`` and optionally ``valid.txt`` / ``test.txt``. Files are read,
decoded and encoded in blocks of a few MB that end at unit boundaries, so a large corpus never
becomes a Python list of tokens; the ids of each split are a compact numpy array (uint16 when
the vocabulary allows, else int32).

Encoded ids are cached under ``cache_root() / "encoded" / KEY`` as ``.npy`` files that are
memory-mapped on load, next to the vocabulary and a ``manifest.json`` holding each file's
length and sha256. KEY hashes the cache format version, the bytes of every split, the
tokenizer settings, the text encoding and the vocabulary settings (or the given vocabulary),
so a changed file or setting misses the cache; a file that does not match its manifest is
rebuilt, never trusted. Every file is written to a temporary name and renamed into place.

Batching follows the classic recipe: the training stream (preceded by one ``<eos>``, so the
first token is predicted from the same start context as in evaluation) is laid out as
``batch_size`` contiguous columns, and each BPTT window ``x = data[t : t+L]`` has targets
``y = data[t+1 : t+1+L]``; the hidden state is carried from one window to the next.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mmap
import os
import secrets
import shutil
import sys
import sysconfig
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .checkpoint import atomic_write_text
from .errors import UsageError
from .text import EOS, EOS_CODE, EOS_ID, UNK, UNK_ID, Encoder, Tokenizer, Vocab, id_dtype

SPLITS = ("train", "valid", "test")
_READ_HINT = 1 << 22          # bytes read (and decoded) at a time; a block ends at a newline
_HASH_BLOCK = 1 << 20
PROGRESS_MIN_BYTES = 32 << 20  # smaller sources encode in a few seconds: no progress bar
CACHE_FORMAT = "rnnlm-encoded"
CACHE_VERSION = 2


# -- the embedded default corpus ---------------------------------------------------------

def cache_root(cache_dir: str | None = None) -> Path:
    """Where rnnlm caches things: `cache_dir`, else $RNNLM_CACHE, else ~/.cache/rnnlm."""
    root = cache_dir or os.environ.get("RNNLM_CACHE") or Path.home() / ".cache" / "rnnlm"
    return Path(root).expanduser()


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(parts))
    except OSError as e:
        raise UsageError(f"cannot write the default corpus to {out.parent}: {e.strerror or e}; set data.cache_dir "
                         f"(or $RNNLM_CACHE) to a writable folder, or pass --data PATH") from None
    return out


# -- a folder of files (data.glob) --------------------------------------------------------

STALE_AFTER_S = 24 * 3600  # an older gathered text untouched this long is deleted (see _remove_older)


def _touch(path: Path) -> None:
    """Mark a gathered text as in use now (its modification time), so clean-ups leave it alone."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache: nobody can clean it up either
        pass


def _remove_older(corpora: Path, folder_key: str, keep: tuple[Path, ...]) -> None:
    """Delete the older gathered texts of one folder and pattern (with their descriptions, and temporary
    files left by killed processes) once nobody has used them for STALE_AFTER_S.

    A process reads its gathered text while it starts (counting, building the vocabulary, encoding),
    and marks it each time it gathers or reuses it; a day's grace covers any start-up, and needs no
    file locks, which Windows and NFS-mounted caches do not give the way POSIX local disks do.
    """
    now = time.time()
    for old in list(corpora.glob(f"files-{folder_key}-*")) + list(corpora.glob(f".files-{folder_key}-*")):
        if old in keep:
            continue
        try:
            if now - old.stat().st_mtime > STALE_AFTER_S:
                old.unlink()
        except OSError:  # gone already, or open in another process (Windows)
            pass


def _prune_encoded(cache: Path) -> None:
    """Delete encoded-ids entries (``encoded/<key>/``) made from gathered texts that have since been
    cleaned up (:func:`_remove_older`): each edit of a `data.glob` folder makes a new text and a new
    entry, and without this they would pile up. An entry goes when every split it was encoded from
    is a gathered text under `cache`/corpora that no longer exists and nobody has used the entry for
    STALE_AFTER_S (each cache hit marks its manifest), whatever source hit it. The entry is renamed
    out of the way first, so a half-deleted one is never looked up; where renaming an open entry
    fails (Windows), it is left for a later clean-up."""
    corpora = cache / "corpora"
    now = time.time()
    try:
        manifests = list((cache / "encoded").glob("*/manifest.json"))
    except OSError:
        return
    for man in manifests:
        try:
            if now - man.stat().st_mtime <= STALE_AFTER_S:
                continue
            sources = json.loads(man.read_text(encoding="utf-8")).get("sources")
            paths = [Path(str(v).rsplit(" [bytes ", 1)[0]) for v in (sources or {}).values()]
            if not paths or not all(q.parent == corpora and q.name.startswith("files-") and not q.exists()
                                    for q in paths):
                continue
            trash = man.parent.with_name(f".deleting-{man.parent.name}-{secrets.token_hex(4)}")
            man.parent.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        except (OSError, ValueError, AttributeError):  # in use (Windows), gone already, or not ours to judge
            pass


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def utf16_error(name) -> UsageError:
    """The message for a file that starts with a UTF-16 byte-order mark (rnnlm reads ASCII-compatible text)."""
    return UsageError(f"{name}: looks like UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to "
                      f"UTF-8, e.g. `iconv -f UTF-16 -t UTF-8 FILE > FILE.utf8`")


def _bad_bytes(path: Path, encoding: str, line: int, offset: int, e: UnicodeDecodeError, hint: str) -> UsageError:
    """The message for undecodable bytes: the file, line and byte offset, the bytes, and what fixes it."""
    return UsageError(f"{path}: invalid {encoding} at line {line}, byte offset {offset} (bytes "
                      f"{e.object[e.start:e.end][:4].hex(' ')}: {e.reason}); {hint}")


def _append_text_file(q: Path, w, codec: str, errors: str, hint: str, lead: bytes = b"") -> str:
    """Append file `q` to the open binary file `w` after `lead` (a UTF-8 BOM dropped, a final newline
    added), unless it is binary (a NUL byte: "binary") or blank ("empty"); "text" if appended.
    Read in blocks, twice (checked, then copied), so a big file never sits in memory whole. A file
    that cannot be read is a UsageError; a failed write to `w` is left to the caller (an OSError)."""
    bom = codecs.BOM_UTF8 if codec == "utf-8" else b""

    def blocks(f):
        f.seek(0)
        if bom and f.read(len(bom)) != bom:
            f.seek(0)
        while True:
            try:
                at = f.tell()
                block = f.read(_READ_HINT)
            except OSError as e:
                raise UsageError(f"cannot read data file {q}: {e.strerror or e}") from None
            if not block:
                return
            yield at, block

    try:
        f = open(q, "rb")
    except OSError as e:
        raise UsageError(f"cannot read data file {q}: {e.strerror or e}") from None
    with f:
        dec = codecs.getincrementaldecoder(codec)(errors)
        lines, blank = 0, True
        for at, block in blocks(f):
            if b"\x00" in block:  # binary (the test git and grep use)
                return "binary"
            try:
                dec.decode(block)
            except UnicodeDecodeError as e:  # e.object: the decoder's held bytes (never a newline) + block
                line = lines + e.object.count(b"\n", 0, e.start) + 1
                offset = at - (len(e.object) - len(block)) + e.start
                raise _bad_bytes(q, codec, line, offset, e, hint) from None
            lines += block.count(b"\n")
            blank = blank and not block.strip()
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError as e:  # the file ends inside a character
            raise UsageError(f"{q}: invalid {codec} at its end (a truncated character: {e.reason}); {hint}") from None
        if blank:
            return "empty"
        w.write(lead)
        last = b""
        for _, block in blocks(f):
            w.write(block)
            last = block[-1:]
    if last != b"\n":
        w.write(b"\n")
    return "text"


def _is_run_dir(d: Path) -> bool:
    """An rnnlm run directory (it writes both files when a run starts)."""
    return (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file()


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def glob_corpus_path(root: Path, pattern: str, encoding: str = "utf-8", errors: str = "strict",
                     cache_dir: str | None = None, option: str = "data.glob") -> tuple[Path, str]:
    """Every file under `root` matching `pattern` (``Path.glob`` syntax: '**/*.py' reaches into
    subfolders), concatenated in path order into one cached text file; returns it and a description.

    As char-rnn trained on the Linux kernel: the files' texts are separated by a blank line, so
    `eos: paragraph` (the char-level default) ends a sample where a file ends, and the train/valid/
    test split cuts the concatenation by position (the last files in path order are the held-out
    ones). Left out: names starting with a dot at any depth, files holding a NUL byte (binary),
    blank files, rnnlm run directories (a folder with config.yaml and metrics.jsonl) and rnnlm's own
    cache folders. Each file is decoded here, so a bad byte is reported against the file that holds
    it. The result is reused while every matched file keeps its name, size, mtime, ctime and inode;
    older gathered texts of the same folder and pattern are removed once unused for a day (see
    _remove_older).
    """
    codec = check_encoding(encoding)
    if not pattern or not pattern.strip():
        raise UsageError(f"{option} is empty; give a pattern such as '**/*.py'"
                         + (", or null for a directory with train.txt" if option == "data.glob" else ""))
    if ".." in Path(pattern).parts:
        raise UsageError(f"{option}={pattern!r} leaves the data directory ('..'); give the folder to read as "
                         f"--data and a pattern inside it, such as '**/*.py'")
    root = root.resolve()
    cache = cache_root(cache_dir).expanduser().resolve()
    own = (cache / "corpora", cache / "encoded")  # rnnlm's own cache folders (the data may live near them)
    try:
        with os.scandir(root):
            pass
        matched = [q for q in root.glob(pattern) if q.is_file()]
    except (ValueError, NotImplementedError) as e:  # '/abs/*.py', '**.py' on old Pythons, ...
        raise UsageError(f"{option}={pattern!r} is not a usable pattern ({e}); give one relative to the data "
                         f"directory, such as '**/*.py'") from None
    except OSError as e:
        raise UsageError(f"cannot list the files under {root}: {e.strerror or e}") from None
    run_dirs: dict[Path, bool] = {}  # each folder checked once

    def in_run_dir(rel: Path) -> bool:
        for k in range(1, len(rel.parts)):
            d = root.joinpath(*rel.parts[:k])
            if d not in run_dirs:
                run_dirs[d] = _is_run_dir(d)
            if run_dirs[d]:
                return True
        return False

    files = []
    for q in matched:
        rel = q.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        real = q.resolve()
        if any(d == real or d in real.parents for d in own):
            continue
        if in_run_dir(rel):
            continue
        files.append((rel.as_posix(), q))
    files.sort()
    if not files:
        tip = ("'**' alone matches folders: '**/*' matches every file" if Path(pattern).name == "**" else
               "'**/*.py' matches Python files in every subfolder, '*.txt' text files at the top")
        raise UsageError(f"no files under {root} match {option}={pattern!r} (names starting with a dot and rnnlm "
                         f"run directories are left out); {tip}")
    if option == "data.glob" and (root / "train.txt").is_file():
        warnings.warn(f"{root} holds train.txt, but data.glob is set: the files matching {pattern!r} are the "
                      f"corpus, split by data.split, and train.txt / valid.txt / test.txt are ordinary files "
                      f"(set data.glob=null to use them as the splits)", stacklevel=3)
    stats = []
    for rel, q in files:
        try:
            st = q.stat()
        except OSError as e:
            raise UsageError(f"cannot read data file {q}: {e.strerror or e}") from None
        # ctime (the inode's change time, which a write always moves and `touch -d`, `cp -p` or
        # `rsync -a` cannot set back) and the inode catch an edit that keeps size and mtime
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    where = os.fsencode(root).decode("utf-8", "backslashreplace")  # JSON-safe whatever the folder's name
    folder_key = hashlib.sha256(json.dumps([where, pattern]).encode()).hexdigest()[:12]
    files_key = hashlib.sha256(json.dumps([codec, errors, stats]).encode()).hexdigest()[:12]
    corpora = cache / "corpora"
    out = corpora / f"files-{folder_key}-{files_key}.txt"
    meta = out.with_suffix(".json")

    def describe(info: dict) -> str:
        left = [_plural(info[k], what) for k, what in (("binary_skipped", "binary file"),
                                                       ("empty_skipped", "blank file")) if info.get(k)]
        return (f"{_plural(info['files'], 'file')} matching {pattern!r} under {root}"
                + (f" ({' and '.join(left)} left out)" if left else ""))

    if out.is_file():  # gathered already (by this process or another): reuse it, if its description is sound
        try:
            desc = describe(json.loads(meta.read_text(encoding="utf-8")))
            _touch(out)
            _touch(meta)
            _remove_older(corpora, folder_key, keep=(out, meta))
            _prune_encoded(cache)
            return out, desc
        except Exception:  # a missing or damaged description: gather again
            pass
    hint = ("data.errors=replace replaces undecodable bytes, data.encoding=ENCODING names another encoding"
            if option == "data.glob" else "--encoding ENCODING names another encoding")
    tmp = None
    try:
        corpora.mkdir(parents=True, exist_ok=True)
        tmp = _unique_tmp(corpora / f".files-{folder_key}")
        counts = {"text": 0, "binary": 0, "empty": 0}
        with open(tmp, "xb") as w:
            for rel, q in files:
                kind = _append_text_file(q, w, codec, errors, f"{hint}, or narrow {option} to leave the file out",
                                         lead=b"\n" if counts["text"] else b"")
                counts[kind] += 1
        if not counts["text"]:
            raise UsageError(f"the {_plural(len(files), 'file')} under {root} matching {option}={pattern!r} hold "
                             f"no text ({counts['binary']:,} binary, {counts['empty']:,} blank)")
        info = {"root": where, "glob": pattern, "files": counts["text"], "binary_skipped": counts["binary"],
                "empty_skipped": counts["empty"]}
        _write_json(meta, info)
        try:
            os.replace(tmp, out)
        except PermissionError:  # Windows: another process gathered the same text and has it open
            if not out.is_file():
                raise
        _touch(out)
        _touch(meta)
        _remove_older(corpora, folder_key, keep=(out, meta))
        _prune_encoded(cache)
    except OSError as e:
        where_to = "set data.cache_dir" if option == "data.glob" else "set $RNNLM_CACHE"
        raise UsageError(f"cannot write the gathered text to {corpora}: {e.strerror or e}; "
                         f"{where_to} to a writable folder") from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)  # after a failure; gone already after the rename
            except OSError:
                pass
    return out, describe(info)


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

    def size(self) -> int:
        end = self.path.stat().st_size if self.end is None else self.end
        return max(0, end - self.start)


def check_readable(path: Path, what: str = "data file") -> None:
    """A file the user named must open for reading: a UsageError that says why not (permissions,
    a broken link...) instead of an OSError deep inside the reader."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


_DOWNLOADABLE = ("tinyshakespeare", "ptb", "ptb_char", "wikitext-2")  # scripts/download_data.py's corpora


def _codec_name(encoding: str, option: str = "data.encoding") -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UsageError(f"unknown text encoding {encoding!r} ({option}); use e.g. utf-8, latin-1, "
                         f"cp1252") from None


def check_encoding(encoding: str, option: str = "data.encoding") -> str:
    """The codec's canonical name; encodings whose newline is not the byte 0x0A are refused."""
    name = _codec_name(encoding, option)
    if "\n".encode(name) != b"\n" or "a".encode(name) != b"a":
        raise UsageError(f"{option}={encoding} is not supported: rnnlm reads text by lines and needs an "
                         f"ASCII-compatible encoding (utf-8, latin-1, cp1252, gb18030, shift_jis, ...); convert "
                         f"the file first, e.g. `iconv -f {encoding} -t UTF-8 FILE > FILE.utf8`")
    return name


def read_blocks(src: TextSource, encoding: str = "utf-8", errors: str = "strict",
                block_bytes: int | None = None) -> Iterator[tuple[str, int]]:
    """Decoded text of `src` in blocks of about `block_bytes` that end after a newline.

    Yields (text, number of raw bytes it came from). A UTF-8 byte-order mark at the start of
    the file is dropped. Undecodable bytes raise a UsageError naming the file, the line and
    the byte offset, with the settings that fix it.
    """
    codec = check_encoding(encoding)
    utf8 = codec == "utf-8"
    block_bytes = block_bytes or _READ_HINT
    line_no = 1
    with open(src.path, "rb") as f:
        pos = src.start  # file offset of the first byte of `carry`
        if pos == 0 and utf8:
            head = f.read(3)
            if head.startswith(UTF16_BOMS):
                raise utf16_error(src.path)
            if head == codecs.BOM_UTF8 and (src.end is None or src.end >= 3):
                pos = 3
        f.seek(pos)
        carry = b""
        eof = False
        mid_text = False  # the previous block was cut inside a line that holds a non-space character
        while not eof:
            want = block_bytes if src.end is None else min(block_bytes, src.end - pos - len(carry))
            new = f.read(want) if want > 0 else b""
            eof = not new
            raw = carry + new if carry else new
            if not raw:
                break
            cut = len(raw) if eof else raw.rfind(b"\n") + 1
            if cut == 0 and len(raw) >= block_bytes:  # a line longer than a block (text8 is one line)
                cut = _soft_cut(raw, mid_text, codec)
            if cut == 0:  # read on
                carry = raw
                continue
            block, carry = raw[:cut], raw[cut:]
            mid_text = not block.endswith(b"\n")
            if b"\x00" in block:
                off = block.index(b"\x00")
                nul_line = line_no + block.count(b"\n", 0, off)
                raise UsageError(f"{src.path}: looks like a binary file (NUL byte at line {nul_line}, "
                                 f"byte offset {pos + off}); rnnlm reads text files")
            try:
                text = block.decode(codec, errors)
            except UnicodeDecodeError as e:
                line = line_no + block.count(b"\n", 0, e.start)
                raise _bad_bytes(src.path, encoding, line, pos + e.start, e,
                                 f"if the file is in another encoding, convert it (iconv -f ENCODING -t {encoding}), or "
                                 f"name its encoding: data.encoding=ENCODING for training, --encoding ENCODING for "
                                 f"eval-perplexity and score; data.errors=replace replaces undecodable bytes") from None
            line_no += block.count(b"\n")
            pos += len(block)
            yield text, len(block)


def _soft_cut(raw: bytes, mid_text: bool, codec: str) -> int:
    """Where to cut a block inside a line (0 = nowhere): after its last space, provided the line
    holds a non-space character before it, which keeps the tokenizer's state across the cut simple.
    A space byte never occurs inside a multi-byte character of an ASCII-compatible encoding."""
    p = raw.rfind(b" ")
    if p < 0:
        return 0
    start = raw.rfind(b"\r", 0, p) + 1  # a CR ends a line too (it becomes LF)
    if start or not mid_text:
        rest = raw[start:p].strip()
        if not rest or (not rest.isascii() and rest.decode(codec, "replace").isspace()):
            return 0
    return p + 1


def read_lines(src: TextSource, encoding: str = "utf-8", errors: str = "strict") -> Iterator[str]:
    """Decoded lines of `src`, each with its final "\\n" (only "\\n" ends a line here)."""
    partial = ""
    for text, _ in read_blocks(src, encoding, errors):
        lines = text.split("\n")
        last = lines.pop()
        if partial and lines:
            lines[0] = partial + lines[0]
            partial = ""
        for line in lines:
            yield line + "\n"
        partial += last
    if partial:
        yield partial


def iter_clean_chunks(src: TextSource, tok: Tokenizer, encoding: str = "utf-8", errors: str = "strict",
                      block_bytes: int | None = None,
                      progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Cleaned text of `src` in chunks of a few MB that each end after a newline.

    A raw block ends after a newline, so CRLF pairs, normalisation and case mapping never
    straddle two chunks (the BOM was dropped by the reader). Feed them to `Tokenizer.pieces`
    or `Encoder.encode_chunks`, which carry the paragraph state across chunk boundaries.
    """
    for block, nbytes in read_blocks(src, encoding, errors, block_bytes):
        yield tok.clean(block, strip_bom=False)
        if progress is not None:
            progress(nbytes)


_LONG_LINE = 1 << 20


def _cut_after(f, target: int) -> int:
    """The first line boundary at or after byte `target`; inside a line longer than 1 MB (text8 is
    one 100 MB line), the first boundary after a space instead."""
    f.seek(target - 1)
    piece = f.readline(_LONG_LINE)  # finish the line the cut falls in (a cut right after '\n' stays put)
    if piece.endswith(b"\n") or len(piece) < _LONG_LINE:
        return target - 1 + len(piece)
    sp = piece.find(b" ")
    if sp >= 0:
        return target + sp
    while piece and not piece.endswith(b"\n"):  # no space either: read on to the end of the line
        piece = f.readline(_LONG_LINE)
    return f.tell()


def split_file(path: Path, fractions: list[float]) -> dict[str, TextSource]:
    """Cut one file into contiguous train/valid/test byte ranges at line boundaries.

    A line longer than 1 MB may be cut after a space (see `_cut_after`).
    """
    size = path.stat().st_size
    cuts = [0]
    acc = 0.0
    with open(path, "rb") as f:
        for i, frac in enumerate(fractions[:-1]):
            acc += frac
            target = int(round(acc * size))
            if i == 0 and frac > 0:
                target = max(target, 1)  # the training split gets at least its first line
            if target <= cuts[-1]:
                cuts.append(cuts[-1])
                continue
            if target >= size:
                cuts.append(size)
                continue
            cuts.append(min(_cut_after(f, target), size))
    cuts.append(size)
    out = {}
    for name, frac, a, b in zip(SPLITS, fractions, cuts, cuts[1:]):
        if b > a:
            out[name] = TextSource(path, a, b)
        elif frac > 0 and name != "train":
            warnings.warn(f"data.split gives the {name} split {frac:g} of the text ({size:,} bytes), which is less "
                          f"than a line there: the run has no {name} split; raise its share of data.split",
                          stacklevel=3)
    return out


def resolve_sources(data_cfg) -> tuple[dict[str, TextSource], str]:
    """Map each available split to its text; also return a description of the corpus."""
    if data_cfg.path is None:
        if getattr(data_cfg, "glob", None) is not None:
            raise UsageError(f"data.glob={data_cfg.glob!r} needs data.path: the directory whose files to train on "
                             f"(--data DIR)")
        path = default_corpus_path(data_cfg.cache_dir)
        desc = f"embedded default corpus: the Python {sys.version_info.major}.{sys.version_info.minor} standard library"
        return split_file(path, data_cfg.split), desc
    if not str(data_cfg.path).strip():
        raise UsageError("data.path is empty; give a text file or a directory with train.txt (or leave it unset "
                         "for the embedded default corpus)")
    p = Path(data_cfg.path).expanduser()
    pattern = getattr(data_cfg, "glob", None)
    if pattern is not None:
        if not p.is_dir():
            raise UsageError(f"data.glob={pattern!r} needs data.path to be a directory, and {p} is "
                             f"{'a file' if p.exists() else 'not found'}; give the folder whose files to train on")
        path, desc = glob_corpus_path(p, pattern, data_cfg.encoding, data_cfg.errors, data_cfg.cache_dir)
        return split_file(path, data_cfg.split), desc
    if p.is_dir():
        srcs = {}
        for name in SPLITS:
            f = p / f"{name}.txt"
            if f.is_file():
                srcs[name] = TextSource(f)
            elif name != "train" and (f.exists() or f.is_symlink()):  # a folder, a dangling link: not silently no split
                raise UsageError(f"{f} is not a regular file; {name}.txt must be a text file (or absent, for no "
                                 f"{name} split)")
        if "train" not in srcs:
            if (p / "train.txt").exists():
                raise UsageError(f"{p / 'train.txt'} is not a regular file; the data directory needs a text file "
                                 f"train.txt (and optionally valid.txt, test.txt)")
            raise UsageError(f"data directory {p} has no train.txt (expected train.txt and optionally "
                             f"valid.txt, test.txt); to train on all the files in it, such as a code base, add "
                             f"data.glob='**/*.py' (or another pattern)")
        for src in srcs.values():
            check_readable(src.path)
        return srcs, str(p)
    if p.is_file():
        check_readable(p)
        if p.stat().st_size == 0:
            raise UsageError(f"data file {p} is empty")
        return split_file(p, data_cfg.split), str(p)
    if p.exists():  # a pipe or a device: the corpus is read more than once, so it must be a file
        raise UsageError(f"data path {p} is not a regular file (a pipe or a device); save the text to a file "
                         f"and give that")
    known = next((part for part in p.parts if part in _DOWNLOADABLE), None)
    hint = (f"; {known} downloads with `python scripts/download_data.py {known}` (from the repository), or "
            f"give its place with --data PATH") if known else ""
    raise UsageError(f"data path not found: {p} (give a text file, or a directory with train.txt){hint}")


# -- progress ------------------------------------------------------------------------------

class _Progress:
    """A tqdm byte counter on stderr, only for big sources and only when stderr is a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None):
        if enabled is None:
            enabled = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# -- counting and encoding -----------------------------------------------------------------

def count_tokens(src: TextSource, tok: Tokenizer, encoding: str = "utf-8", errors: str = "strict",
                 progress: bool | None = None) -> Counter:
    """Token counts of `src` (EOS included), read in chunks."""
    with _Progress(src.size(), f"counting {src.path.name}", progress) as bar:
        pieces = tok.pieces(iter_clean_chunks(src, tok, encoding, errors, progress=bar))
        if tok.level == "char":  # a histogram of code points, EOS_CODE standing for <eos>
            hist = np.zeros(EOS_CODE + 1, dtype=np.int64)
            for pc in pieces:
                hist += np.bincount(tok.piece_codes(pc), minlength=EOS_CODE + 1)
            counter: Counter = Counter()
            for cp in np.flatnonzero(hist).tolist():
                counter[EOS if cp == EOS_CODE else chr(cp)] = int(hist[cp])
            return counter
        counter = Counter()
        for pc in pieces:
            counter.update(tok.piece_tokens(pc))
        return counter


class _NpyWriter:
    """Appends 1-D arrays to a .npy file under a temporary name; `commit` renames it into place.

    The header is written first for length 0 and rewritten at the end; numpy pads headers so
    that the length field can grow in place. The sha256 of the data bytes is computed on the way.
    """

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tmp = _unique_tmp(path.with_name(f".{path.name}"))
        self.f = open(self.tmp, "wb")
        self.n = 0
        self.sha = hashlib.sha256()
        self._header(0)
        self.offset = self.f.tell()

    def _header(self, n: int) -> None:
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})

    def write(self, arr: np.ndarray) -> None:
        b = np.ascontiguousarray(arr, dtype=self.dtype).tobytes()
        self.f.write(b)
        self.sha.update(b)
        self.n += len(arr)

    def commit(self) -> dict:
        self.f.seek(0)
        self._header(self.n)
        if self.f.tell() != self.offset:  # pragma: no cover - numpy always pads for growth
            raise RuntimeError("npy header changed size")
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "length": self.n, "dtype": self.dtype.str, "offset": self.offset,
                "bytes": self.offset + self.n * self.dtype.itemsize, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def encode_source(src: TextSource, tok: Tokenizer, vocab: Vocab, encoding: str = "utf-8",
                  errors: str = "strict", *, out: Path | None = None, stats: dict | None = None,
                  progress: bool | None = None) -> np.ndarray:
    """Ids of `src`, encoded chunk by chunk.

    With `out`, the ids go straight into that .npy file (written atomically) and come back
    memory-mapped, so a big corpus never sits in memory twice. `stats`, when given, receives
    ``tokens``, ``oov`` (tokens outside the vocabulary; a literal ``<unk>`` is not OOV) and,
    with `out`, the file's ``sha256``, ``bytes`` and ``offset`` for a cache manifest.
    """
    enc = Encoder(tok, vocab)
    with _Progress(src.size(), f"encoding {src.path.name}", progress) as bar:
        chunks = enc.encode_chunks(iter_clean_chunks(src, tok, encoding, errors, progress=bar))
        if out is None:
            # stored after a leading <eos>, so that with_start() needs no copy (see there)
            ids = np.concatenate([np.array([EOS_ID], dtype=enc.dtype), *chunks])[1:]
            info: dict = {}
        else:
            writer = _NpyWriter(out, enc.dtype)
            try:
                writer.write(np.array([EOS_ID]))  # the start context, as in memory
                for ids in chunks:
                    writer.write(ids)
                info = writer.commit()
            except BaseException:
                writer.abort()
                raise
            ids = np.load(out, mmap_mode="r")[1:]
    if stats is not None:
        stats.update(info, tokens=enc.tokens, oov=enc.oov)
    return ids


def encode_text(text: str, tok: Tokenizer, vocab: Vocab) -> np.ndarray:
    return Encoder(tok, vocab).encode(tok.clean(text))


def oov_count(ids: np.ndarray) -> int:
    """Ids equal to <unk>: OOV tokens plus literal ``<unk>`` words (see Corpus.oov for OOV only)."""
    return int(np.count_nonzero(ids == UNK_ID))


# -- the on-disk cache ---------------------------------------------------------------------

def source_digest(src: TextSource) -> str:
    """sha256 of the bytes of `src` (its byte range only)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    left = src.size()
    with open(src.path, "rb") as f:
        f.seek(src.start)
        while left > 0:
            n = f.readinto(view[: min(_HASH_BLOCK, left)])
            if not n:
                break
            h.update(view[:n])
            left -= n
    return h.hexdigest()




def _file_sha256(path: Path, offset: int = 0) -> str:
    return source_digest(TextSource(path, offset))


def cache_settings(srcs: dict[str, TextSource], tok: Tokenizer, data_cfg, vocab: Vocab | None = None) -> dict:
    """Everything the encoded ids depend on (the file contents by hash, not by name)."""
    vocab_part = ({"given": vocab.fingerprint()} if vocab is not None
                  else {"min_freq": data_cfg.min_freq, "max_vocab": data_cfg.max_vocab})
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "tokenizer": tok.to_dict(),
            "encoding": _codec_name(data_cfg.encoding), "errors": data_cfg.errors, "vocab": vocab_part,
            "sources": {name: source_digest(src) for name, src in srcs.items()}}


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _unique_tmp(stem: Path) -> Path:
    """A temporary name beside `stem` that no other process, on this machine or another sharing the cache
    folder, picks at the same time (a pid alone repeats across containers and nodes)."""
    return stem.with_name(f"{stem.name}-{os.getpid()}-{secrets.token_hex(6)}.tmp")


def _write_json(path: Path, obj: dict) -> None:
    tmp = _unique_tmp(path.with_name(f".{path.name}"))
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not valid UTF-8 (surrogate escapes): \u escapes round-trip it
        raw = (json.dumps(obj, ensure_ascii=True, indent=1) + "\n").encode("ascii")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


class CacheMiss(Exception):
    """The cache entry is absent or does not match its manifest (the reason is the message)."""


def _load_cache_entry(d: Path, key: str, names: list[str]) -> tuple[Vocab, dict[str, np.ndarray], dict]:
    """Vocabulary, memory-mapped ids and manifest of cache entry `d`, each file checked against
    its manifest (size and sha256); raises CacheMiss otherwise."""
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise CacheMiss("absent")
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
        if man.get("format") != CACHE_FORMAT or man.get("version") != CACHE_VERSION or man.get("key") != key:
            raise CacheMiss("manifest of another format or key")
        if sorted(man["splits"]) != sorted(names):
            raise CacheMiss("manifest lists other splits")
        vinfo = man["vocab"]
        vpath = d / vinfo["file"]
        if vpath.stat().st_size != vinfo["bytes"] or _file_sha256(vpath) != vinfo["sha256"]:
            raise CacheMiss(f"{vpath.name} does not match its checksum")
        vocab, _ = Vocab.load(vpath)
        splits = {}
        for name in names:
            info = man["splits"][name]
            path = d / info["file"]
            if path.stat().st_size != info["bytes"]:
                raise CacheMiss(f"{path.name} has {path.stat().st_size} bytes, expected {info['bytes']}")
            if _file_sha256(path, info["offset"]) != info["sha256"]:
                raise CacheMiss(f"{path.name} does not match its checksum")
            arr = np.load(path, mmap_mode="r")
            if (arr.shape != (info["tokens"] + 1,) or arr.dtype.str != info["dtype"]
                    or arr.dtype != id_dtype(len(vocab)) or arr[0] != EOS_ID):
                raise CacheMiss(f"{path.name} has the wrong shape or type")
            splits[name] = arr[1:]  # after the stored start context
        return vocab, splits, man
    except CacheMiss:
        raise
    except (OSError, ValueError, KeyError, TypeError, UsageError) as e:
        raise CacheMiss(f"unreadable ({type(e).__name__}: {e})") from None


# -- the corpus ----------------------------------------------------------------------------

@dataclass
class Corpus:
    vocab: Vocab
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    description: str = ""
    oov: dict[str, int] = field(default_factory=dict)  # per split: tokens outside the vocabulary
    cache_dir: Path | None = None                      # the cache entry holding the ids, if any
    cached: bool = False                               # True when loaded from the cache

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    def get(self, name: str) -> np.ndarray | None:
        return self.splits.get(name)


def _check_nonempty(name: str, src: TextSource, n: int) -> None:
    if n == 0:
        if name == "train":
            raise UsageError(f"training text {src.describe()} has no tokens")
        raise UsageError(f"{name} text {src.describe()} tokenizes to nothing; remove it or give it text")


def load_corpus(data_cfg, eos: str, vocab: Vocab | None = None, tokenizer: Tokenizer | None = None) -> Corpus:
    """Read the configured corpus; build the vocabulary from the training split (unless given).

    Encoded ids come from the on-disk cache when an entry matches the files and settings, else
    they are encoded and cached (``data.cache: false`` turns the cache off).
    """
    srcs, desc = resolve_sources(data_cfg)
    tok = tokenizer or Tokenizer.from_config(data_cfg, eos)
    encoding, errors = data_cfg.encoding, data_cfg.errors
    names = list(srcs)

    d: Path | None = None
    if getattr(data_cfg, "cache", True):
        settings = cache_settings(srcs, tok, data_cfg, vocab)
        key = cache_key(settings)
        d = cache_root(data_cfg.cache_dir) / "encoded" / key
        try:
            cvocab, splits, man = _load_cache_entry(d, key, names)
            if vocab is not None and cvocab.itos != vocab.itos:  # pragma: no cover - the key covers it
                raise CacheMiss("vocabulary differs")
            oov = {n: int(man["splits"][n]["oov"]) for n in names}
            _touch(d / "manifest.json")  # in use: kept by the clean-up of data.glob texts (_prune_encoded)
            return Corpus(vocab or cvocab, tok, splits, desc, oov, d, cached=True)
        except CacheMiss as e:
            if str(e) != "absent":
                warnings.warn(f"encoded-data cache {d} is invalid ({e}); rebuilding it", stacklevel=2)
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / "manifest.json").unlink(missing_ok=True)  # untrusted until rewritten at the end
        except OSError as e:
            warnings.warn(f"cannot write the encoded-data cache in {d} ({e}); encoding in memory "
                          f"(set data.cache_dir or $RNNLM_CACHE to a writable folder)", stacklevel=2)
            d = None

    if vocab is None:
        counter = count_tokens(srcs["train"], tok, encoding, errors)
        if not counter:
            raise UsageError(f"training text {srcs['train'].describe()} has no tokens")
        vocab = Vocab.build(counter, data_cfg.min_freq, data_cfg.max_vocab)
        if all(t in (UNK, EOS) for t in vocab.itos):
            raise UsageError(f"data.min_freq={data_cfg.min_freq} leaves no token in the vocabulary (the most frequent "
                             f"one occurs {max((c for t, c in counter.items() if t not in (UNK, EOS)), default=0):,} times "
                             f"in the training text); lower data.min_freq")

    splits, oov, infos = {}, {}, {}
    for name, src in srcs.items():
        st: dict = {}
        try:
            ids = encode_source(src, tok, vocab, encoding, errors, stats=st,
                                out=None if d is None else d / f"{name}.npy")
        except OSError as e:
            if d is None:
                raise
            warnings.warn(f"cannot write the encoded-data cache in {d} ({e}); encoding in memory", stacklevel=2)
            d = None
            ids = encode_source(src, tok, vocab, encoding, errors, stats=st)
        _check_nonempty(name, src, len(ids))
        splits[name], oov[name], infos[name] = ids, st["oov"], st

    if d is not None:
        try:
            vpath = d / "vocab.json"
            vocab.save(vpath, tok)
            _write_json(d / "manifest.json", {
                "format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "settings": settings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "sources": {n: s.describe() for n, s in srcs.items()},
                "vocab": {"file": vpath.name, "bytes": vpath.stat().st_size, "sha256": _file_sha256(vpath)},
                "splits": {n: {k: infos[n][k] for k in ("file", "tokens", "length", "dtype", "offset", "bytes",
                                                        "sha256", "oov")} for n in names}})
        except OSError as e:
            warnings.warn(f"cannot write the encoded-data cache in {d} ({e})", stacklevel=2)
    return Corpus(vocab, tok, splits, desc, oov, d, cached=False)


# -- batching ------------------------------------------------------------------------------

def with_start(ids: np.ndarray) -> np.ndarray:
    """Prepend the start context (<eos>): the first token is predicted from it.

    The splits of a Corpus are stored right after an <eos> (``full[1:]``); for such a view the
    result is ``full`` itself (read-only, memory-mapped when cached), so a big training split is
    not copied.
    """
    base = ids.base
    if (isinstance(base, np.ndarray) and ids.ndim == 1 and base.ndim == 1 and len(base) == len(ids) + 1
            and base.dtype == ids.dtype and base.strides == ids.strides
            and ids.ctypes.data - base.ctypes.data == ids.itemsize and base[0] == EOS_ID):
        return base
    out = np.empty(len(ids) + 1, dtype=ids.dtype)
    out[0] = EOS_ID
    out[1:] = ids
    return out


_PREFAULT_BYTES = 64 << 20


def _prefaulted_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty, with the pages of a big array mapped in one system call where Linux allows
    (MAP_POPULATE): touching a fresh 400 MB array page by page can cost more than filling it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes >= _PREFAULT_BYTES and populate and hasattr(mmap, "MAP_ANONYMOUS"):
        try:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
            return np.frombuffer(buf, dtype=dtype).reshape(shape)
        except (OSError, ValueError):
            pass
    return np.empty(shape, dtype=dtype)


def batchify(ids: np.ndarray, batch_size: int) -> torch.Tensor:
    """Lay a 1-D id stream out as `batch_size` contiguous columns: (T, B) int32.

    With n = (len(ids) - 1) // B, column b holds ids[b*n : b*n + n + 1] (T = n + 1): each
    column starts with the last token of the column before, so every token after the first is
    a target exactly once per pass; only the < B tokens of the tail are dropped.
    Ids stay compact (int32) and are widened to int64 one window at a time.
    """
    n = (len(ids) - 1) // batch_size
    if n < 1:
        raise UsageError(f"corpus too small: {len(ids)} tokens cannot fill {batch_size} columns of at least 2 tokens; "
                         f"lower train.batch_size or give more text")
    out = _prefaulted_empty((n + 1, batch_size), np.int32)
    view = ids[: n * batch_size].reshape(batch_size, n)
    # Transpose block by block in the compact type, then widen contiguously: ~10x faster than
    # one big strided copy of a 100M-token stream.
    step = max(1, (1 << 19) // batch_size)
    tmp = np.empty((step, batch_size), dtype=ids.dtype)
    for a in range(0, n, step):
        m = min(step, n - a)
        tmp[:m] = view[:, a:a + m].T
        out[a:a + m] = tmp[:m]
    out[n, :-1] = view[1:, 0]
    out[n, -1] = ids[n * batch_size]
    return torch.from_numpy(out)  # (T, B)


# AWD-LSTM's variable window length (Merity et al. 2018, section 4.1): the base length is bptt with
# probability 0.95, else bptt / 2, and the window's length is drawn from N(base, 5 tokens).
VARIABLE_BPTT_P = 0.95
VARIABLE_BPTT_SIGMA = 5.0


def window_bounds(n_targets: int, bptt: int, seed: int | None = None, epoch: int = 0) -> np.ndarray:
    """Where one pass's windows start, plus the end: window i predicts targets ``bounds[i] + 1 ..
    bounds[i + 1]`` of a (n_targets + 1, B) stream, i.e. it is ``data[bounds[i] : bounds[i + 1] + 1]``.

    `seed` None: windows of `bptt` tokens (the last one shorter).
    Otherwise AWD-LSTM's variable lengths: each window N(bptt, 5) tokens long, or N(bptt / 2, 5) one
    time in 20, clipped to [min(5, bptt), bptt + 20]; the draws come from a generator of their own
    seeded by (seed, epoch), so every epoch cuts the text differently, every process of a torchrun
    job cuts it alike, and a resumed run finds the same windows.
    """
    if n_targets < 1:
        return np.zeros(1, dtype=np.int64)
    if seed is None:
        return np.append(np.arange(0, n_targets, bptt, dtype=np.int64), n_targets)
    rng = np.random.default_rng([seed % 2 ** 64, epoch])
    lo, hi = max(1, min(5, bptt)), bptt + 20
    k = n_targets // lo + 1                      # enough windows even if every one is as short as can be
    base = np.where(rng.random(k) < VARIABLE_BPTT_P, float(bptt), bptt / 2)
    lengths = np.clip(rng.normal(base, VARIABLE_BPTT_SIGMA).astype(np.int64), lo, hi)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, n_targets)) + 1   # the first window reaching the end closes the pass
    return np.concatenate([[0], np.minimum(ends[:n], n_targets)]).astype(np.int64)


def window(data: torch.Tensor, bounds: np.ndarray, i: int) -> torch.Tensor:
    """Window i of a pass cut at `bounds` (:func:`window_bounds`) as one (L + 1, B) view of `data`:
    inputs ``[:-1]``, targets ``[1:]``."""
    return data[int(bounds[i]): int(bounds[i + 1]) + 1]


def get_window(data: torch.Tensor, bounds: np.ndarray, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window i: inputs (L, B) and targets (L, B), the inputs shifted by one, as int64."""
    block = window(data, bounds, i)
    return block[:-1].long(), block[1:].long()
