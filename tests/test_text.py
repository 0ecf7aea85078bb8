"""Tokenizers, vocabulary and encoder: conventions, round trips, determinism."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from rnnlm.errors import UsageError
from rnnlm.text import (EOS, EOS_ID, SPECIALS, UNK, UNK_ID, Encoder, Tokenizer, Vocab, id_dtype, iter_chunks)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Arbitrary Unicode without CR (CRLF/CR conversion is a convention tested on its own).
unicode_text = st.text(alphabet=st.characters(blacklist_characters="\r", blacklist_categories=("Cs",)), max_size=80)
# Text made of lines, some blank (spaces/tabs only) and some empty, to exercise the EOS policies.
line = st.one_of(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                         max_size=12),
                 st.sampled_from(["", " ", "\t ", "\u3000"]))
lines_text = st.lists(line, max_size=12).map("\n".join) | st.lists(line, max_size=12).map(
    lambda ls: "".join(x + "\n" for x in ls))
# Lines of words and spaces (for cuts inside lines).
spaced_line = st.lists(st.sampled_from(["", " ", "ab", "é", "中文", "\t", "\u3000", "x y"]),
                       max_size=6).map(" ".join)
spaced_text = st.lists(spaced_line, max_size=8).map("\n".join)


def roundtrip(tok: Tokenizer, text: str) -> str:
    """detokenize(decode(encode(tokenize(text)))) with a vocabulary built from `text` (no OOV)."""
    toks = tok.tokenize(text)
    vocab = Vocab.build(Counter(toks))
    ids = vocab.encode(toks)
    assert UNK_ID not in ids or UNK in toks
    return tok.detokenize(vocab.decode(ids))


def _blank(s: str) -> bool:
    return not s.strip()


def paragraphs_oracle(text: str) -> list[str]:
    """Maximal runs of non-blank lines, found line by line (independent of the regex in text.py)."""
    out, cur = [], []
    for ln in text.split("\n"):
        if ln.strip():
            cur.append(ln)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


# -- vocabulary -----------------------------------------------------------------------------

def test_specials_first_even_when_absent_from_the_counts():
    v = Vocab.build(Counter("hello"))
    assert v.itos[:2] == list(SPECIALS) == [UNK, EOS]
    assert (v.stoi[UNK], v.stoi[EOS]) == (UNK_ID, EOS_ID) == (0, 1)
    assert len(v) == 2 + len(set("hello"))


def test_literal_unk_is_the_unk_token_and_is_counted():
    v = Vocab.build(Counter({"a": 3, UNK: 5, EOS: 2}))
    assert v.itos == [UNK, EOS, "a"]
    assert v.counts == [5, 2, 3]
    assert v.encode([UNK, "a", "zzz"]) == [UNK_ID, 2, UNK_ID]


def test_order_descending_frequency_ties_by_token():
    v = Vocab.build(Counter({"b": 2, "a": 2, "c": 5, "d": 1}))
    assert v.itos[2:] == ["c", "a", "b", "d"]


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 6), max_size=30))
def test_order_is_sorted_by_count_then_token(counts):
    v = Vocab.build(Counter(counts))
    body = [(-counts[t], t) for t in v.itos[2:]]
    assert body == sorted(body)
    assert set(v.itos[2:]) == set(counts) - set(SPECIALS)


def test_min_freq_and_max_vocab():
    c = Counter({"a": 5, "b": 4, "c": 2, "d": 1, "e": 1})
    v = Vocab.build(c, min_freq=2)
    assert v.itos[2:] == ["a", "b", "c"]
    assert v.counts[0] == 2  # d and e became <unk>
    v = Vocab.build(c, max_vocab=4)  # specials included
    assert len(v) == 4 and v.itos[2:] == ["a", "b"]
    assert v.counts[0] == 4
    assert Vocab.build(c, min_freq=2, max_vocab=100).itos == v.build(c, min_freq=2).itos


def test_vocab_json_round_trip(tmp_path):
    tok = Tokenizer(level="word", eos="line", lowercase=True, tokenizer="simple", normalize="NFC")
    v = Vocab.build(Counter({"naïve": 3, "中文": 2, "😀": 2, UNK: 1, EOS: 4}))
    path = tmp_path / "vocab.json"
    v.save(path, tok)
    assert not [p for p in tmp_path.iterdir() if p.name != "vocab.json"]  # no temp file left
    assert "中文" in path.read_text(encoding="utf-8")  # human-readable, not \\u-escaped
    v2, tok2 = Vocab.load(path)
    assert v2.itos == v.itos and v2.counts == v.counts and tok2 == tok
    assert Vocab.from_dict(v.to_dict()).itos == v.itos
    assert v2.fingerprint() == v.fingerprint() != Vocab.build(Counter("xy")).fingerprint()


def test_vocab_rejects_foreign_json(tmp_path):
    p = tmp_path / "v.json"
    p.write_text('{"tokens": ["a"]}')
    with pytest.raises(UsageError, match="rnnlm vocabulary"):
        Vocab.load(p)
    with pytest.raises(UsageError, match="special tokens"):
        Vocab(["a", "b"])
    with pytest.raises(UsageError, match="duplicate"):
        Vocab([UNK, EOS, "a", "a"])


def test_id_dtype():
    assert id_dtype(65535) == np.uint16 and id_dtype(65536) == np.int32


# -- char level -----------------------------------------------------------------------------

def test_char_tokens_are_code_points():
    tok = Tokenizer(level="char", eos="none")
    text = "naïve 中文 😀 👍🏽"
    assert tok.tokenize(text) == list(text)
    assert "😀" in tok.tokenize(text) and "中" in tok.tokenize(text)
    v = Vocab.build(Counter(tok.tokenize(text)))
    assert "".join(v.decode(v.encode(tok.tokenize(text)))) == text


@FAST
@given(unicode_text)
def test_char_round_trip_is_exact_without_eos(text):
    assume(not text.startswith("\ufeff"))
    assert roundtrip(Tokenizer(level="char", eos="none"), text) == text


@FAST
@given(unicode_text | lines_text)
def test_char_round_trip_line_policy_adds_only_a_final_newline(text):
    # Each "\n" becomes <eos> and back; a last line without its newline gets one, unless it is
    # only whitespace (then it is no line: its characters stay, without <eos>).
    assume(not text.startswith("\ufeff"))
    tail = text.rsplit("\n", 1)[-1]
    expected = text if tail == "" or tail.isspace() else text + "\n"
    assert roundtrip(Tokenizer(level="char", eos="line"), text) == expected


@FAST
@given(unicode_text | lines_text)
def test_char_round_trip_paragraph_policy_keeps_paragraphs(text):
    # What survives: every paragraph (a maximal run of non-blank lines) verbatim, each followed
    # by one blank line; runs of blank lines and leading/trailing blank lines are normalised.
    assume(not text.startswith("\ufeff"))
    tok = Tokenizer(level="char", eos="paragraph")
    out = roundtrip(tok, text)
    assert out == "".join(p + "\n\n" for p in paragraphs_oracle(text))
    assert roundtrip(tok, out) == out  # the normal form is a fixed point
    assert tok.tokenize(text).count(EOS) == len(paragraphs_oracle(text))


def test_a_literal_eos_word_is_the_end_of_unit_token():
    # As a literal <unk> is the unknown-word token (PTB's convention), a literal <eos> word is <eos>:
    # the vocabulary cannot hold a second token spelled the same. It comes back as a line end.
    for eos, want in (("none", ["a", EOS, "b"]), ("line", ["a", EOS, "b", EOS])):
        tok = Tokenizer(level="word", eos=eos)
        assert tok.tokenize("a <eos> b\n") == want
        assert roundtrip(tok, "a <eos> b\n").split("\n")[:2] == ["a", "b"]
    assert Tokenizer(level="char", eos="none").tokenize("<eos>") == list("<eos>")   # characters, not a token


def test_paragraph_examples():
    tok = Tokenizer(level="char", eos="paragraph")
    assert tok.units("\n \nab\ncd\n\n \t\nef\n  \n") == ["ab\ncd", "ef"]
    assert tok.units("ab  \n\u3000\ncd") == ["ab  ", "cd"]  # any whitespace-only line is blank
    assert tok.units(" \n\n") == []


# -- word level -----------------------------------------------------------------------------

@FAST
@given(unicode_text | lines_text)
def test_word_round_trip_up_to_whitespace(text):
    assume(not text.startswith("\ufeff"))
    assume(EOS not in text.split())          # a literal <eos> word is the end-of-unit token (below)
    out = roundtrip(Tokenizer(level="word", eos="none"), text)
    assert out.split() == text.split()
    out = roundtrip(Tokenizer(level="word", eos="line"), text)
    lines = text.split("\n")
    if not lines[-1].strip():  # what follows the last newline is a line only if it holds a word
        lines.pop()
    assert [ln.split() for ln in out.split("\n")[:-1]] == [ln.split() for ln in lines]


def test_simple_tokenizer_splits_punctuation():
    tok = Tokenizer(level="word", eos="none", tokenizer="simple")
    assert tok.tokenize("Hello, world! It's 3.5 (ok)") == \
        ["Hello", ",", "world", "!", "It's", "3", ".", "5", "(", "ok", ")"]
    assert Tokenizer(level="word", eos="none").tokenize("Hello, world!") == ["Hello,", "world!"]


def test_line_policy_puts_eos_after_every_line_including_empty_ones():
    tok = Tokenizer(level="word", eos="line")
    assert tok.tokenize(" a b \n\n c \n") == ["a", "b", EOS, EOS, "c", EOS]
    assert tok.tokenize("a") == ["a", EOS]
    # whitespace after the last newline is not a line (Mikolov's ptb.char ends with "\n ")
    assert tok.tokenize("a\n \t") == ["a", EOS]
    assert Tokenizer(level="char", eos="line").tokenize("a\n ") == ["a", EOS, " "]


# -- cleaning conventions ---------------------------------------------------------------------

def test_crlf_and_cr_become_lf():
    tok = Tokenizer(level="char", eos="none")
    assert tok.tokenize("a\r\nb\rc\n") == list("a\nb\nc\n")
    assert Tokenizer(level="word", eos="line").tokenize("a b\r\nc\r\n") == ["a", "b", EOS, "c", EOS]


def test_bom_ignored_only_at_the_start():
    tok = Tokenizer(level="char", eos="none")
    assert tok.tokenize("\ufeffab") == ["a", "b"]
    assert tok.tokenize("a\ufeffb") == ["a", "\ufeff", "b"]
    assert tok.clean("\ufeffab", strip_bom=False) == "\ufeffab"


def test_nfc_normalisation_is_optional():
    decomposed = "e\u0301"  # e + combining acute
    assert Tokenizer(level="char", eos="none").tokenize(decomposed) == ["e", "\u0301"]
    assert Tokenizer(level="char", eos="none", normalize="NFC").tokenize(decomposed) == ["é"]
    assert Tokenizer(level="char", eos="none", normalize="NFKC").tokenize("ﬁ") == ["f", "i"]


def test_lowercase():
    tok = Tokenizer(level="word", eos="none", lowercase=True)
    assert tok.tokenize("The CAT Ünïcode ΑΣ") == ["the", "cat", "ünïcode", "ας"]


def test_bad_settings_are_usage_errors():
    for kw in ({"level": "byte"}, {"eos": "sentence"}, {"tokenizer": "bpe"}, {"normalize": "NFD"}):
        with pytest.raises(UsageError):
            Tokenizer(**kw)


# -- vocabulary order invariance ----------------------------------------------------------------

@FAST
@given(st.lists(line, min_size=1, max_size=15), st.randoms(use_true_random=False),
       st.sampled_from(["char", "word"]), st.sampled_from(["line", "paragraph", "none"]))
def test_vocab_order_invariant_under_shuffled_lines(lines, rnd, level, eos):
    tok = Tokenizer(level=level, eos=eos)
    shuffled = list(lines)
    rnd.shuffle(shuffled)

    def build(ls):
        c: Counter = Counter()
        tok.count(tok.clean("".join(x + "\n" for x in ls)), c)
        return Vocab.build(c)

    a, b = build(lines), build(shuffled)
    if eos != "paragraph":
        assert a.itos == b.itos and a.counts == b.counts
    else:
        # Shuffling moves blank lines, which changes how many paragraphs there are (<eos>) and, at
        # char level, how many newlines are inside paragraphs; every other token keeps its rank.
        def rest(v):
            return [(t, c) for t, c in zip(v.itos[2:], v.counts[2:]) if t != "\n"]

        assert rest(a) == rest(b)


# -- encoder ----------------------------------------------------------------------------------

@FAST
@given(unicode_text | lines_text, unicode_text, st.sampled_from(["char", "word"]),
       st.sampled_from(["line", "paragraph", "none"]))
def test_encoder_matches_vocab_encode_and_counts_oov(train, other, level, eos):
    tok = Tokenizer(level=level, eos=eos)
    vocab = Vocab.build(Counter(tok.tokenize(train)))
    toks = tok.tokenize(other)
    enc = Encoder(tok, vocab)
    ids = enc.encode(tok.clean(other))
    assert ids.dtype == np.uint16
    assert ids.tolist() == vocab.encode(toks)
    assert enc.tokens == len(toks)
    assert enc.oov == sum(1 for t in toks if t not in vocab)


def test_literal_unk_word_is_not_oov():
    tok = Tokenizer(level="word", eos="line")
    vocab = Vocab.build(Counter(tok.tokenize("a <unk> b\n")))
    enc = Encoder(tok, vocab)
    ids = enc.encode("a <unk> zzz\n")
    assert ids.tolist() == [vocab.stoi["a"], UNK_ID, UNK_ID, EOS_ID]
    assert enc.oov == 1


@FAST
@given(lines_text | spaced_text, st.data(), st.sampled_from(["char", "word"]),
       st.sampled_from(["line", "paragraph", "none"]))
def test_encoding_in_chunks_equals_encoding_the_whole(text, data, level, eos):
    # Chunks may be cut after any newline, even inside a paragraph, and inside a line after a
    # space once the line holds a non-space character.
    tok = Tokenizer(level=level, eos=eos)
    vocab = Vocab.build(Counter(tok.tokenize(text)))
    allowed = []
    line_start = 0
    for i, c in enumerate(text):
        if c == "\n":
            allowed.append(i + 1)
            line_start = i + 1
        elif c == " " and not _blank(text[line_start:i]):
            allowed.append(i + 1)
    cuts = sorted(data.draw(st.lists(st.sampled_from(allowed), unique=True))) if allowed else []
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    whole = Encoder(tok, vocab).encode(text)
    parts = list(Encoder(tok, vocab).encode_chunks(chunks))
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=whole.dtype)
    assert joined.tolist() == whole.tolist()
    assert [t for pc in tok.pieces(chunks) for t in tok.piece_tokens(pc)] == tok.tokenize(text)


@FAST
@given(lines_text, st.integers(1, 8), st.sampled_from(["line", "paragraph", "none"]))
@example("\n\ufeff", 1, "line")  # U+FEFF starting a later chunk is a character, not a BOM
def test_iter_chunks_keeps_tokens(text, chunk_chars, eos):
    for level in ("char", "word"):
        tok = Tokenizer(level=level, eos=eos)
        lines = text.splitlines(keepends=True)
        chunks = list(iter_chunks(iter(lines), tok, chunk_chars=chunk_chars))
        assert "".join(chunks) == text
        # each chunk tokenized on its own; after the first, a leading U+FEFF is a character, not a BOM
        per_chunk = [t for i, c in enumerate(chunks)
                     for pc in tok.pieces([tok.clean(c, strip_bom=i == 0)]) for t in tok.piece_tokens(pc)]
        assert per_chunk == tok.tokenize(text)


def test_encoder_handles_many_distinct_chars():
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(5000))
    tok = Tokenizer(level="char", eos="none")
    vocab = Vocab.build(Counter(text))
    assert Encoder(tok, vocab).encode(text).tolist() == vocab.encode(list(text))
