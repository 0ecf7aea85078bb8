"""Tokenizers and the vocabulary.

Two levels: ``char`` (one token per Unicode code point: accents, CJK characters and emoji
are single tokens) and ``word`` (whitespace, as in the Penn Treebank, or a simple
tokenizer that also splits punctuation). Two special tokens: ``<unk>`` (anything outside
the vocabulary; a literal ``<unk>`` word in the text *is* this token, as in PTB) and
``<eos>`` (the end of a unit, placed according to the EOS policy; at word level a literal
``<eos>`` word is this token too, whatever the policy):

* ``line``      -- after every line, empty lines included (the PTB / WikiText convention,
                   default for words); at char level the ``"\\n"`` itself becomes ``<eos>``.
                   Text after the last newline is a line only if it holds a non-space character;
* ``paragraph`` -- after every paragraph: a maximal run of lines that are not blank (a blank
                   line holds only whitespace). Default for chars; newlines inside a
                   paragraph stay ordinary ``"\\n"`` characters;
* ``none``      -- never (at char level the newlines stay in the text).

Before tokenizing, text is *cleaned*: a leading byte-order mark is dropped, CRLF and CR
become LF, then the optional Unicode normalisation (NFC/NFKC) and lowercasing apply.

The vocabulary is built from the training split only: specials first, then tokens by
descending frequency, ties broken by the token itself, so it is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import UsageError

UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (UNK, EOS)
UNK_ID, EOS_ID = 0, 1
VOCAB_FORMAT = "rnnlm-vocab"
VOCAB_VERSION = 1
# One past the last Unicode code point: stands for <eos> in arrays of code points.
EOS_CODE = 0x110000

_SIMPLE_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)
# A newline followed by one or more blank lines (whitespace only): the gap between paragraphs.
_PARAGRAPH_GAP = re.compile(r"\n(?:[^\S\n]*\n)+")


def code_points(text: str) -> np.ndarray:
    """The code points of `text` as uint32 (lone surrogates kept as themselves)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _is_blank(s: str) -> bool:
    return not s or s.isspace()


def _strip_blank_lines(p: str) -> str:
    """Drop blank lines at the start and the end of `p` (and a final newline)."""
    while p:
        i = p.find("\n")
        if i < 0 or not _is_blank(p[:i]):
            break
        p = p[i + 1:]
    while p:
        i = p.rfind("\n")
        if i < 0 or not _is_blank(p[i + 1:]):
            break
        p = p[:i]
    return "" if _is_blank(p) else p


@dataclass
class Piece:
    """The units of one chunk of a text stream (see `Tokenizer.pieces`)."""

    units: list[str]
    eos_before: bool = False     # first close a paragraph left open by the previous chunk
    join_previous: bool = False  # the first unit continues that paragraph (a "\n" joins them)
    last_open: bool = False      # no EOS after the last unit yet (its paragraph goes on, or eos=none)


@dataclass(frozen=True)
class Tokenizer:
    """Turns text into token strings (with EOS markers) and token strings back into text."""

    level: str = "char"            # char | word
    eos: str = "paragraph"         # line | paragraph | none
    lowercase: bool = False
    tokenizer: str = "whitespace"  # word level: whitespace | simple
    normalize: str | None = None   # None | NFC | NFKC

    def __post_init__(self) -> None:
        if self.level not in ("char", "word"):
            raise UsageError(f"unknown token level {self.level!r}; use char or word")
        if self.eos not in ("line", "paragraph", "none"):
            raise UsageError(f"unknown EOS policy {self.eos!r}; use line, paragraph or none")
        if self.tokenizer not in ("whitespace", "simple"):
            raise UsageError(f"unknown word tokenizer {self.tokenizer!r}; use whitespace or simple")
        if self.normalize not in (None, "NFC", "NFKC"):
            raise UsageError(f"unknown Unicode normalisation {self.normalize!r}; use NFC, NFKC or null")

    @classmethod
    def from_config(cls, data_cfg, eos: str) -> "Tokenizer":
        return cls(level=data_cfg.level, eos=eos, lowercase=data_cfg.lowercase,
                   tokenizer=data_cfg.tokenizer, normalize=data_cfg.normalize)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- text -> units ------------------------------------------------------------------
    def clean(self, text: str, strip_bom: bool = True) -> str:
        """Apply the text conventions: BOM dropped, CRLF/CR -> LF, normalisation, lowercase.

        `strip_bom=False` for pieces from the middle of a file, where U+FEFF is a character.
        """
        if strip_bom and text.startswith("\ufeff"):
            text = text[1:]
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        if self.lowercase:
            text = text.lower()
        return text

    def units(self, text: str) -> list[str]:
        """Split cleaned text into the pieces that each end with EOS (one piece if eos=none).

        With eos=line, text after the last newline is a line only if it holds a non-space
        character (trailing whitespace at the end of a file ends no sentence).
        """
        if self.eos == "none":
            return [text] if text else []
        if self.eos == "line":
            lines = text.split("\n")
            if _is_blank(lines[-1]):
                lines.pop()  # the final newline ends the last line; it does not start a new one
            return lines
        # paragraph: only the first and the last piece can carry blank lines at their edges
        pieces = _PARAGRAPH_GAP.split(text)
        pieces[0] = _strip_blank_lines(pieces[0])
        pieces[-1] = _strip_blank_lines(pieces[-1])
        return [p for p in pieces if p]

    def split_words(self, unit: str) -> list[str]:
        if self.tokenizer == "simple":
            return _SIMPLE_WORD.findall(unit)
        return unit.split()

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`, with EOS where the policy puts it (text is cleaned first)."""
        return [t for pc in self.pieces([self.clean(text)]) for t in self.piece_tokens(pc)]

    def count(self, text: str, counter: Counter) -> None:
        """Add the token counts of (cleaned) `text` to `counter`."""
        for pc in self.pieces([text]):
            counter.update(self.piece_tokens(pc))

    def pieces(self, chunks: Iterable[str]) -> Iterator["Piece"]:
        """The units of cleaned text given in consecutive chunks, with the state carried over.

        A chunk ends after a newline, or inside a line after a space once that line holds a
        non-space character (how `rnnlm.data.read_blocks` cuts lines longer than a block). The
        state (a line or a paragraph still open) is carried from chunk to chunk, so neither a
        book-length paragraph nor a 100 MB line (text8) is ever held whole. Emitting the pieces
        one after another gives exactly the tokens of the joined text.
        """
        if self.eos == "none":
            for text in chunks:
                if text:
                    yield Piece([text], last_open=True)
            return
        line = self.eos == "line"
        mid = False       # the previous chunk ended inside a line
        has_text = False  # line policy: that line holds a non-space character
        open_ = False     # paragraph policy: a paragraph is open (its <eos> is still to come)
        for text in chunks:
            if not text:
                continue
            if mid:  # first finish the line the previous chunk left open
                i = text.find("\n")
                head = text if i < 0 else text[:i]
                if line:
                    has_text = has_text or not _is_blank(head)
                yield Piece([head], last_open=not line or i < 0)  # line policy: EOS if the line ends here
                if i < 0:
                    continue
                mid = False
                text = text[i + 1:]
                if not text:
                    continue
            # `text` starts at the beginning of a line
            mid = not text.endswith("\n")
            if line:
                lines = text.split("\n")
                last = lines.pop()  # "" unless the chunk ends inside a line
                if last:
                    has_text = not _is_blank(last)
                    yield Piece(lines + [last], last_open=True)
                elif lines:
                    yield Piece(lines)
                continue
            units = self.units(text)
            i = text.find("\n")
            first_blank = _is_blank(text if i < 0 else text[:i])
            body = text[:-1] if text.endswith("\n") else text
            last_blank = _is_blank(body[body.rfind("\n") + 1:])
            join = open_ and bool(units) and not first_blank
            close = open_ and not join
            last_open = bool(units) and not last_blank
            yield Piece(units, eos_before=close, join_previous=join, last_open=last_open)
            open_ = last_open if units else (open_ and not close)
        # whitespace after the last newline is no line: it gets no <eos>
        if (line and mid and has_text) or (not line and open_):
            yield Piece([], eos_before=True)

    def codes(self, text: str) -> np.ndarray:
        """Char level: the code points of cleaned `text` with EOS_CODE where <eos> goes (uint32)."""
        parts = [self.piece_codes(pc) for pc in self.pieces([text])]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def piece_codes(self, pc: "Piece") -> np.ndarray:
        """Char level: the code points of one piece, EOS_CODE standing for <eos> (uint32)."""
        if self.eos == "none":
            return code_points(pc.units[0]) if pc.units else np.zeros(0, dtype=np.uint32)
        if self.eos == "line":  # each unit is a line: its newline becomes EOS
            text = ("\n" if pc.eos_before else "") + "\n".join(pc.units)
            if pc.units and not pc.last_open:
                text += "\n"
            cp = code_points(text)
            return np.where(cp == 10, np.uint32(EOS_CODE), cp)
        # Join the units with a character that is not in them, encode in one go, then turn the
        # separators into EOS.
        sep = _free_char(pc.units)
        text = ("\n" if pc.join_previous else "") + sep.join(pc.units)
        if pc.units and not pc.last_open:
            text += sep
        if pc.eos_before:
            text = sep + text
        cp = code_points(text)
        return np.where(cp == ord(sep), np.uint32(EOS_CODE), cp)

    def piece_tokens(self, pc: "Piece") -> list[str]:
        """The token strings of one piece (word or char level)."""
        if self.level == "char":
            return [EOS if c == EOS_CODE else chr(c) for c in self.piece_codes(pc).tolist()]
        out = [EOS] if pc.eos_before else []
        n = len(pc.units)
        for i, u in enumerate(pc.units):
            out.extend(self.split_words(u))
            if not (pc.last_open and i == n - 1):
                out.append(EOS)
        return out

    def detokenize(self, tokens: Iterable[str]) -> str:
        """Inverse of tokenize (up to whitespace at word level)."""
        eos_text = "\n\n" if self.eos == "paragraph" else "\n"
        if self.level == "char":
            return "".join(eos_text if t == EOS else t for t in tokens)
        parts: list[str] = []
        line: list[str] = []
        for t in tokens:
            if t == EOS:
                parts.append(" ".join(line) + eos_text)
                line = []
            else:
                line.append(t)
        if line:
            parts.append(" ".join(line))
        return "".join(parts)


class Vocab:
    """Token <-> id mapping with ``<unk>`` (id 0) and ``<eos>`` (id 1).

    >>> v = Vocab.build(Counter("abracadabra"))
    >>> v.decode(v.encode(list("cab")))
    ['c', 'a', 'b']
    """

    def __init__(self, tokens: list[str], counts: list[int] | None = None):
        if list(tokens[: len(SPECIALS)]) != list(SPECIALS):
            raise UsageError("vocabulary must start with the special tokens <unk>, <eos>")
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise UsageError("vocabulary has duplicate tokens")
        self.counts = list(counts) if counts is not None else None
        self.unk_id = UNK_ID
        self.eos_id = EOS_ID

    @classmethod
    def build(cls, counter: Counter, min_freq: int = 1, max_vocab: int | None = None) -> "Vocab":
        """Specials first, then by descending count, ties by the token itself."""
        eos_count = counter.get(EOS, 0)
        unk_count = counter.get(UNK, 0)
        items = sorted(((t, c) for t, c in counter.items() if t not in SPECIALS and c >= min_freq),
                       key=lambda tc: (-tc[1], tc[0]))
        if max_vocab is not None:
            items = items[: max(0, max_vocab - len(SPECIALS))]
        kept = sum(c for _, c in items)
        total = sum(c for t, c in counter.items() if t not in SPECIALS)
        unk_count += total - kept  # everything cut by min_freq / max_vocab becomes <unk>
        return cls(list(SPECIALS) + [t for t, _ in items], [unk_count, eos_count] + [c for _, c in items])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Iterable[str]) -> list[int]:
        get = self.stoi.get
        return [get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def fingerprint(self) -> str:
        """sha256 of the token list: equal fingerprints mean equal token <-> id mappings."""
        return hashlib.sha256(json.dumps(self.itos, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self, tokenizer: Tokenizer | None = None) -> dict:
        d = {"format": VOCAB_FORMAT, "version": VOCAB_VERSION,
             "specials": {"unk": UNK, "eos": EOS}, "size": len(self)}
        if tokenizer is not None:
            d["tokenizer"] = tokenizer.to_dict()
        d["tokens"] = self.itos
        if self.counts is not None:
            d["counts"] = self.counts
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or d.get("format") != VOCAB_FORMAT or not isinstance(d.get("tokens"), list):
            raise UsageError("not an rnnlm vocabulary (expected a JSON object with format 'rnnlm-vocab')")
        if int(d.get("version", 0)) > VOCAB_VERSION:
            raise UsageError(f"vocabulary format version {d.get('version')} is newer than this rnnlm supports "
                             f"({VOCAB_VERSION}); upgrade rnnlm")
        return cls([str(t) for t in d["tokens"]], d.get("counts"))

    def save(self, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
        """Write the vocabulary as JSON, atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(tokenizer), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> tuple["Vocab", Tokenizer | None]:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read vocabulary {path}: {e}") from None
        try:
            tok = Tokenizer(**d["tokenizer"]) if isinstance(d, dict) and "tokenizer" in d else None
        except TypeError as e:
            raise UsageError(f"vocabulary {path} has bad tokenizer settings: {e}") from None
        return cls.from_dict(d), tok


# -- fast encoding -----------------------------------------------------------------------

def id_dtype(vocab_size: int) -> np.dtype:
    """The most compact integer type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


class Encoder:
    """Encodes cleaned text into an id array quickly (a table lookup at char level).

    `tokens` and `oov` count what all calls of `encode` have produced; `oov` counts tokens
    that are not in the vocabulary (a literal ``<unk>`` word *is* in it, so it is not OOV).
    """

    def __init__(self, tokenizer: Tokenizer, vocab: Vocab):
        self.tok = tokenizer
        self.vocab = vocab
        self.dtype = id_dtype(len(vocab))
        self.tokens = 0
        self.oov = 0
        if tokenizer.level == "char":
            # code point -> id, with EOS_CODE -> EOS_ID; everything else -> UNK_ID
            self._table = np.full(EOS_CODE + 1, UNK_ID, dtype=self.dtype)
            chars = [(ord(t), i) for i, t in enumerate(vocab.itos) if len(t) == 1]
            if chars:
                cps, ids = zip(*chars)
                self._table[np.array(cps, dtype=np.int64)] = np.array(ids, dtype=self.dtype)
            self._table[EOS_CODE] = EOS_ID

    def encode(self, text: str) -> np.ndarray:
        """Ids of cleaned `text` (EOS placed by the policy)."""
        parts = [self.encode_piece(pc) for pc in self.tok.pieces([text])]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """Ids of cleaned text given in consecutive chunks (cut as `Tokenizer.pieces` requires)."""
        for pc in self.tok.pieces(chunks):
            yield self.encode_piece(pc)

    def encode_piece(self, pc: Piece) -> np.ndarray:
        if self.tok.level == "char":
            ids = self._table[self.tok.piece_codes(pc)]
            self.tokens += len(ids)
            self.oov += int(np.count_nonzero(ids == UNK_ID))
            return ids
        get = self.vocab.stoi.get
        with_eos = self.tok.eos != "none"
        out: list[int] = [EOS_ID] if pc.eos_before else []
        oov = 0
        last = len(pc.units) - 1
        for k, u in enumerate(pc.units):
            ids = [get(w, -1) for w in self.tok.split_words(u)]
            if -1 in ids:
                oov += ids.count(-1)
                ids = [UNK_ID if i < 0 else i for i in ids]
            out.extend(ids)
            if with_eos and not (pc.last_open and k == last):
                out.append(EOS_ID)
        self.tokens += len(out)
        self.oov += oov
        return np.asarray(out, dtype=self.dtype)


def _free_char(units: list[str]) -> str:
    for cp in range(0xE000, 0xF900):  # private-use area: practically never in real text
        c = chr(cp)
        if not any(c in u for u in units):
            return c
    raise UsageError("text uses every private-use character; cannot encode")  # pragma: no cover


def _starts_nonblank(line: str) -> bool:
    """Whether the first line of `line` once cleaned (CR ends a line too) holds a non-space character."""
    first = line.split("\r", 1)[0].split("\n", 1)[0]
    return not _is_blank(first)


def iter_chunks(lines: Iterator[str], tokenizer: Tokenizer, chunk_chars: int = 1 << 22) -> Iterator[str]:
    """Group raw (not yet cleaned) lines into chunks of about `chunk_chars` that end at a unit boundary.

    Tokenizing the cleaned chunks one by one gives the same tokens as tokenizing the whole
    text: a chunk ends after a newline, and with the paragraph policy only between a blank line
    and a line that starts a paragraph. (Clean the chunks after the first with
    ``strip_bom=False``: in mid-text U+FEFF is a character.)
    """
    buf: list[str] = []
    size = 0
    prev_blank = False  # the previous item is a whole blank line (it began after a "\n" and ends with one)
    at_start = True     # the current item begins a line (the one before ended with "\n")
    for line in lines:
        if size >= chunk_chars and buf[-1].endswith("\n"):
            if tokenizer.eos != "paragraph" or (prev_blank and _starts_nonblank(line)):
                yield "".join(buf)
                buf, size = [], 0
        buf.append(line)
        size += len(line)
        prev_blank = at_start and line.endswith("\n") and _is_blank(line)
        at_start = line.endswith("\n")
    if buf:
        yield "".join(buf)
