"""Tokenizers and the vocabulary.

Two levels: ``char`` (one token per Unicode code point: accents, CJK characters and emoji
are single tokens) and ``word`` (whitespace, as in the Penn Treebank, or a simple
tokenizer that also splits punctuation). Two special tokens: ``<unk>`` (anything outside
the vocabulary; a literal ``<unk>`` word in the text *is* this token, as in PTB) and
``<eos>`` (the end of a unit, placed according to the EOS policy):

* ``line``      -- after every line (the PTB / WikiText convention, default for words);
* ``paragraph`` -- after every blank-line separated paragraph (default for chars; newlines
                   inside a paragraph stay ordinary ``"\\n"`` characters);
* ``none``      -- never (at char level the newlines stay in the text).

The vocabulary is built from the training split only: specials first, then tokens by
descending frequency, ties broken by the token itself, so it is deterministic.
"""

from __future__ import annotations

import json
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

_SIMPLE_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)
_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")


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

    @classmethod
    def from_config(cls, data_cfg, eos: str) -> "Tokenizer":
        return cls(level=data_cfg.level, eos=eos, lowercase=data_cfg.lowercase,
                   tokenizer=data_cfg.tokenizer, normalize=data_cfg.normalize)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- text -> units ------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """Apply the text conventions: BOM dropped, CRLF/CR -> LF, normalisation, lowercase."""
        if text.startswith("\ufeff"):
            text = text[1:]
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        if self.lowercase:
            text = text.lower()
        return text

    def units(self, text: str) -> list[str]:
        """Split cleaned text into the pieces that each end with EOS (one piece if eos=none)."""
        if self.eos == "none":
            return [text] if text else []
        if self.eos == "line":
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the final newline ends the last line; it does not start a new one
            return lines
        # paragraph: blank-line separated; leading/trailing blank lines carry no paragraph
        return [p for p in _BLANK_LINES.split(text.strip("\n")) if p.strip()] if text.strip() else []

    def split_words(self, unit: str) -> list[str]:
        if self.tokenizer == "simple":
            return _SIMPLE_WORD.findall(unit)
        return unit.split()

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`, with EOS where the policy puts it (text is cleaned first)."""
        text = self.clean(text)
        out: list[str] = []
        for unit in self.units(text):
            out.extend(unit if self.level == "char" else self.split_words(unit))
            if self.eos != "none":
                out.append(EOS)
        return out

    def count(self, text: str, counter: Counter) -> None:
        """Add the token counts of (cleaned) `text` to `counter` -- fast path for vocabulary building."""
        units = self.units(text)
        if self.level == "char":
            for u in units:
                counter.update(u)
        else:
            for u in units:
                counter.update(self.split_words(u))
        if self.eos != "none":
            counter[EOS] += len(units)

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
        Path(path).write_text(json.dumps(self.to_dict(tokenizer), ensure_ascii=False, indent=1) + "\n",
                              encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> tuple["Vocab", Tokenizer | None]:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read vocabulary {path}: {e}") from None
        tok = Tokenizer(**d["tokenizer"]) if isinstance(d, dict) and "tokenizer" in d else None
        return cls.from_dict(d), tok


# -- fast encoding -----------------------------------------------------------------------

def id_dtype(vocab_size: int) -> np.dtype:
    """The most compact integer type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


class Encoder:
    """Encodes cleaned text into an id array quickly (vectorised at char level)."""

    def __init__(self, tokenizer: Tokenizer, vocab: Vocab):
        self.tok = tokenizer
        self.vocab = vocab
        self.dtype = id_dtype(len(vocab))
        if tokenizer.level == "char":
            chars = [(ord(t), i) for i, t in enumerate(vocab.itos) if len(t) == 1]
            chars.sort()
            self._cp = np.array([c for c, _ in chars], dtype=np.uint32)
            self._ids = np.array([i for _, i in chars], dtype=np.int64)

    def _encode_chars(self, text: str) -> np.ndarray:
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if len(self._cp) == 0:
            return np.full(cp.shape, UNK_ID, dtype=np.int64)
        pos = np.searchsorted(self._cp, cp)
        pos = np.minimum(pos, len(self._cp) - 1)
        return np.where(self._cp[pos] == cp, self._ids[pos], UNK_ID)

    def encode(self, text: str) -> np.ndarray:
        """Ids of cleaned `text` (EOS placed by the policy)."""
        units = self.tok.units(text)
        if not units:
            return np.zeros(0, dtype=self.dtype)
        with_eos = self.tok.eos != "none"
        if self.tok.level == "char":
            # Join the units with a character that cannot occur in them, encode in one go, then
            # turn the separators into EOS.
            sep = _free_char(text)
            joined = sep.join(units) + (sep if with_eos else "")
            ids = self._encode_chars(joined)
            if with_eos:
                ids[np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32) == ord(sep)] = EOS_ID
            return ids.astype(self.dtype)
        get = self.vocab.stoi.get
        out: list[int] = []
        for u in units:
            out.extend(get(w, UNK_ID) for w in self.tok.split_words(u))
            if with_eos:
                out.append(EOS_ID)
        return np.asarray(out, dtype=self.dtype)


def _free_char(text: str) -> str:
    for cp in range(0xE000, 0xF900):  # private-use area: practically never in real text
        c = chr(cp)
        if c not in text:
            return c
    raise UsageError("text uses every private-use character; cannot encode")  # pragma: no cover


def iter_chunks(lines: Iterator[str], tokenizer: Tokenizer, chunk_chars: int = 1 << 22) -> Iterator[str]:
    """Group decoded lines into chunks of about `chunk_chars` that end at a unit boundary.

    A chunk ends after a newline (line/none policy) or after a blank line (paragraph policy), so
    tokenizing chunk by chunk gives the same tokens as tokenizing the whole text.
    """
    buf: list[str] = []
    size = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= chunk_chars and line.endswith("\n"):
            if tokenizer.eos == "paragraph" and line.strip():
                continue  # wait for a blank line so paragraphs are not cut
            if tokenizer.eos == "none" and tokenizer.level == "word" and not line[-1:].isspace():
                continue
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)
