"""Reading, splitting, encoding, the on-disk cache, batching, and known answers on real corpora."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnlm.data as data
from rnnlm.config import DataConfig
from rnnlm.data import (TextSource, batchify, cache_root, count_tokens, encode_source, get_window, load_corpus,
                        read_lines, resolve_sources, split_file, window_bounds, with_start)
from rnnlm.errors import UsageError
from rnnlm.text import EOS, EOS_ID, UNK, Encoder, Tokenizer, Vocab

# Many of these files are a few lines long, too short for a valid or test share of the default
# split: the warning that says so (tested on its own below) is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:data.split gives")

FAST = settings(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def cfg(path, **kw) -> DataConfig:
    c = DataConfig(path=str(path))
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# -- reading and conventions ------------------------------------------------------------------

def test_invalid_utf8_names_file_line_and_byte(write_corpus):
    p = write_corpus("bad.txt", b"good line\nsecond\nbro\xffken\n")
    with pytest.raises(UsageError) as e:
        list(read_lines(TextSource(p)))
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "byte offset 20" in msg
    assert "data.encoding" in msg and "data.errors=replace" in msg
    # the same error comes out of load_corpus (the CLI turns it into exit code 2)
    with pytest.raises(UsageError, match="line 3"):
        load_corpus(cfg(p), "line")


def test_invalid_utf8_line_and_offset_in_a_later_block(write_corpus, monkeypatch):
    monkeypatch.setattr(data, "_READ_HINT", 16)  # many small blocks
    body = b"".join(b"line %d\n" % i for i in range(40))
    p = write_corpus("bad.txt", body + b"x\xc3(\n")
    with pytest.raises(UsageError) as e:
        list(read_lines(TextSource(p)))
    assert f"line 41, byte offset {len(body) + 1}" in str(e.value)


def test_errors_replace_and_other_encodings(write_corpus):
    p = write_corpus("bad.txt", b"caf\xe9\n")
    assert list(read_lines(TextSource(p), errors="replace")) == ["caf\ufffd\n"]
    assert list(read_lines(TextSource(p), encoding="latin-1")) == ["café\n"]
    c = load_corpus(cfg(p, encoding="latin-1", level="char", split=[1.0, 0.0, 0.0]), "none")
    assert "é" in c.vocab


def test_unusable_encodings_and_binary_files(write_corpus):
    p = write_corpus("u16.txt", "hello\n".encode("utf-16"))
    with pytest.raises(UsageError, match="UTF-16"):
        list(read_lines(TextSource(p)))
    with pytest.raises(UsageError, match="not supported"):
        list(read_lines(TextSource(p), encoding="utf-16"))
    with pytest.raises(UsageError, match="unknown text encoding"):
        list(read_lines(TextSource(p), encoding="no-such-codec"))
    b = write_corpus("bin.dat", b"ab\ncd\x00ef\n")
    with pytest.raises(UsageError, match="binary file .*line 2, byte offset 5"):
        list(read_lines(TextSource(b)))


def test_bom_and_crlf_give_the_same_ids_as_plain_lf(write_corpus):
    plain = write_corpus("plain", train="one two\nthree\n", valid="two one\n")
    windows = write_corpus("windows", train=b"\xef\xbb\xbfone two\r\nthree\r\n", valid=b"two one\r\n")
    for level in ("char", "word"):
        a = load_corpus(cfg(plain, level=level), "line")
        b = load_corpus(cfg(windows, level=level), "line")
        assert a.vocab.itos == b.vocab.itos
        assert all(np.array_equal(a.splits[n], b.splits[n]) for n in a.splits)
        assert "\ufeff" not in b.vocab and "\r" not in b.vocab


def test_lines_are_cut_at_newline_only(write_corpus):
    p = write_corpus("u.txt", "a\u2028b\x0cc\nd")
    assert list(read_lines(TextSource(p))) == ["a\u2028b\x0cc\n", "d"]


# -- splitting ------------------------------------------------------------------------------------

@FAST
@given(st.lists(st.text(alphabet="abc é中", max_size=30), min_size=1, max_size=40),
       st.floats(0.05, 1.0), st.floats(0.0, 1.0))
def test_single_file_split_is_contiguous_at_line_boundaries(tmp_path_factory, lines, f_train, f_valid):
    f_valid = (1 - f_train) * f_valid
    fractions = [f_train, f_valid, 1 - f_train - f_valid]
    raw = "".join(x + "\n" for x in lines).encode("utf-8")
    p = tmp_path_factory.mktemp("split") / "c.txt"
    p.write_bytes(raw)
    parts = split_file(p, fractions)
    assert "train" in parts
    covered = b""
    for name in ("train", "valid", "test"):
        if name in parts:
            src = parts[name]
            assert src.start == len(covered)  # contiguous, in order
            assert src.start == 0 or raw[src.start - 1:src.start] == b"\n"  # starts at a line start
            covered += raw[src.start:src.end]
    assert covered == raw
    # each cut is the first line boundary at or after its target byte
    target = max(1, round(f_train * len(raw)))
    end = parts["train"].end
    assert end >= min(target, len(raw)) and b"\n" not in raw[target:end - 1]


def test_a_line_longer_than_the_limit_is_split_after_a_space(write_corpus, monkeypatch):
    monkeypatch.setattr(data, "_LONG_LINE", 8)
    text = " ".join(f"w{i}" for i in range(100))  # one long line, as text8
    p = write_corpus("one.txt", text)
    parts = split_file(p, [0.9, 0.05, 0.05])
    assert set(parts) == {"train", "valid", "test"}
    raw = text.encode()
    for src in parts.values():
        assert src.start == 0 or raw[src.start - 1:src.start] == b" "
    assert abs(parts["train"].end - 0.9 * len(raw)) <= 4
    c = load_corpus(cfg(p, level="word", split=[0.9, 0.05, 0.05]), "none")
    assert sum(len(v) for v in c.splits.values()) == 100


def test_single_file_corpus_vocab_from_train_only(write_corpus):
    text = "a a b\n" * 8 + "a b\n" + "c z\n"  # 'c' and 'z' only in the last line
    p = write_corpus("one.txt", text)
    c = load_corpus(cfg(p, level="word", split=[0.9, 0.1, 0.0]), "line")
    assert set(c.splits) == {"train", "valid"}
    assert "c" not in c.vocab and "z" not in c.vocab
    assert c.oov["valid"] == 2 and c.oov["train"] == 0
    assert len(c.train) + len(c.splits["valid"]) == len(Tokenizer(level="word", eos="line").tokenize(text))


# -- vocabulary and OOV ------------------------------------------------------------------------------

def test_valid_only_words_are_oov_and_literal_unk_is_not(write_corpus):
    d = write_corpus("c", train="the cat <unk> sat\nthe dog\n", valid="the cat flew <unk>\n")
    c = load_corpus(cfg(d, level="word"), "line")
    assert "flew" not in c.vocab
    assert c.vocab.itos[:2] == [UNK, EOS]
    v = c.splits["valid"]
    assert [c.vocab.itos[i] for i in v] == ["the", "cat", UNK, UNK, EOS]
    assert c.oov == {"train": 0, "valid": 1}
    assert data.oov_count(v) == 2  # ids equal to <unk>: the OOV word and the literal <unk>


def test_min_freq_and_max_vocab_apply_to_train(write_corpus):
    d = write_corpus("c", train="a a a b b c\n", valid="a b c\n")
    c = load_corpus(cfg(d, level="word", min_freq=2), "line")
    assert c.vocab.itos == [UNK, EOS, "a", "b"] and c.oov["valid"] == 1
    c = load_corpus(cfg(d, level="word", max_vocab=3), "line")
    assert c.vocab.itos == [UNK, EOS, "a"]


def test_count_tokens_fast_path_matches_tokenize(write_corpus):
    text = "Zwölf Boxkämpfer 🥊\n\n  \njagen Viktor 中文\r\nquer über den Sylter Deich.\n"
    p = write_corpus("t.txt", text)
    for level in ("char", "word"):
        for eos in ("line", "paragraph", "none"):
            tok = Tokenizer(level=level, eos=eos, lowercase=True, normalize="NFC")
            assert count_tokens(TextSource(p), tok) == Counter(tok.tokenize(text)), (level, eos)


@FAST
@given(st.lists(st.lists(st.sampled_from(["", " ", "ab", "c d", "é 中", "\t", "x\r", "😀 y", "\u3000", "ab cd ef"]),
                         max_size=6).map(" ".join), max_size=20),
       st.integers(1, 12), st.sampled_from(["char", "word"]), st.sampled_from(["line", "paragraph", "none"]))
def test_file_encoding_in_small_blocks_equals_whole_text(tmp_path_factory, lines, block, level, eos):
    # Blocks shorter than the lines: lines are cut at spaces too (a whole 100 MB line is never read).
    text = "\n".join(lines)
    p = tmp_path_factory.mktemp("blk") / "t.txt"
    p.write_bytes(text.encode("utf-8"))
    tok = Tokenizer(level=level, eos=eos)
    vocab = Vocab.build(Counter(tok.tokenize(text)))
    expected = Encoder(tok, vocab).encode(tok.clean(text)).tolist()
    old = data._READ_HINT
    data._READ_HINT = block
    try:
        assert encode_source(TextSource(p), tok, vocab).tolist() == expected
        assert count_tokens(TextSource(p), tok) == Counter(tok.tokenize(text))
    finally:
        data._READ_HINT = old


# -- the cache -----------------------------------------------------------------------------------

def _entry(c) -> Path:
    assert c.cache_dir is not None and (c.cache_dir / "manifest.json").is_file()
    return c.cache_dir


def test_cache_hit_returns_the_same_memory_mapped_ids(write_corpus, cache_dir):
    d = write_corpus("c", train="hello world\nhello there\n", valid="world hello\n")
    a = load_corpus(cfg(d), "paragraph")
    assert not a.cached and _entry(a).parent == cache_dir / "encoded"
    b = load_corpus(cfg(d), "paragraph")
    assert b.cached and b.cache_dir == a.cache_dir
    assert isinstance(b.train, np.memmap)
    assert b.vocab.itos == a.vocab.itos and b.oov == a.oov
    assert all(np.array_equal(a.splits[n], b.splits[n]) for n in a.splits)
    leftovers = [p.name for p in a.cache_dir.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_cache_location_follows_config_then_env(write_corpus, tmp_path, monkeypatch):
    d = write_corpus("c", train="abc\n")
    monkeypatch.setenv("RNNLM_CACHE", str(tmp_path / "env"))
    assert load_corpus(cfg(d), "line").cache_dir.parent == tmp_path / "env" / "encoded"
    c = load_corpus(cfg(d, cache_dir=str(tmp_path / "key")), "line")
    assert c.cache_dir.parent == tmp_path / "key" / "encoded"
    monkeypatch.delenv("RNNLM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "rnnlm"


@pytest.mark.parametrize("change", ["content", "lowercase", "level", "eos", "min_freq", "max_vocab", "normalize",
                                    "split", "errors"])
def test_changed_file_or_setting_misses_the_cache(write_corpus, cache_dir, change):
    p = write_corpus("c.txt", "Hello World\nhello world again\nfoo bar\nbar foo\n")
    base = cfg(p, level="word")
    a = load_corpus(base, "line")
    kw = {"lowercase": {"lowercase": True}, "level": {"level": "char"}, "min_freq": {"min_freq": 2},
          "max_vocab": {"max_vocab": 4}, "normalize": {"normalize": "NFC"}, "split": {"split": [0.5, 0.5, 0.0]},
          "errors": {"errors": "replace"}}.get(change, {})
    eos = "paragraph" if change == "eos" else "line"
    if change == "content":
        p.write_text("Hello World\nhello world again\nfoo bar\nbar baz\n")
    kw = {"level": "word", **kw}
    b = load_corpus(cfg(p, **kw), eos)
    assert not b.cached and b.cache_dir != a.cache_dir
    assert load_corpus(cfg(p, **kw), eos).cached


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "vocab"])
def test_damaged_cache_is_rebuilt_not_trusted(write_corpus, cache_dir, damage):
    d = write_corpus("c", train="abc abd\nabe\n" * 50, valid="abc\n")
    a = load_corpus(cfg(d), "line")
    expected = {n: np.array(v) for n, v in a.splits.items()}  # copies: the damage below is in place
    entry = _entry(a)
    npy = entry / "train.npy"
    if damage == "flip":
        raw = bytearray(npy.read_bytes())
        raw[-3] ^= 0x01
        npy.write_bytes(bytes(raw))
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-10])
    elif damage == "delete":
        npy.unlink()
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        v = json.loads((entry / "vocab.json").read_text())
        v["tokens"][2], v["tokens"][3] = v["tokens"][3], v["tokens"][2]
        (entry / "vocab.json").write_text(json.dumps(v))
    with pytest.warns(UserWarning, match="invalid.*rebuilding"):
        b = load_corpus(cfg(d), "line")
    assert not b.cached
    assert b.vocab.itos == a.vocab.itos
    assert all(np.array_equal(expected[n], b.splits[n]) for n in expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(cfg(d), "line").cached


def test_given_vocab_bypasses_vocabulary_building(write_corpus, cache_dir, monkeypatch):
    d = write_corpus("c", train="a b c\n", valid="a d\n")
    built = load_corpus(cfg(d, level="word"), "line")
    given = Vocab([UNK, EOS, "d", "a"])

    def boom(*a, **k):
        raise AssertionError("vocabulary must not be built when one is given")

    monkeypatch.setattr(data, "count_tokens", boom)
    c = load_corpus(cfg(d, level="word"), "line", vocab=given)
    assert c.vocab is given and not c.cached and c.cache_dir != built.cache_dir
    assert c.splits["valid"].tolist() == [3, 2, EOS_ID]
    assert c.oov == {"train": 2, "valid": 0}
    again = load_corpus(cfg(d, level="word"), "line", vocab=given)
    assert again.cached and again.vocab is given


def test_tokenizer_given_overrides_config(write_corpus, cache_dir):
    d = write_corpus("c", train="Ab\n")
    tok = Tokenizer(level="char", eos="none", lowercase=True)
    c = load_corpus(cfg(d, level="word"), "line", tokenizer=tok)
    assert c.tokenizer is tok and c.vocab.itos[2:] == ["\n", "a", "b"]


def test_unwritable_cache_falls_back_to_memory(write_corpus, tmp_path):
    d = write_corpus("c", train="abc\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write the encoded-data cache"):
        c = load_corpus(cfg(d, cache_dir=str(blocker)), "line")
    assert c.cache_dir is None and c.train.tolist() == [c.vocab.stoi[ch] for ch in "abc"] + [EOS_ID]


def test_cache_can_be_turned_off(write_corpus, cache_dir):
    d = write_corpus("c", train="abc\n")
    c = load_corpus(cfg(d, cache=False), "line")
    assert c.cache_dir is None and not cache_dir.exists()


def test_failed_encoding_leaves_no_trusted_entry(write_corpus, cache_dir):
    d = write_corpus("c", train="abc\n", valid=b"ab\xff\n")
    with pytest.raises(UsageError, match="valid.txt"):
        load_corpus(cfg(d), "line")
    assert not list(cache_dir.glob("encoded/*/manifest.json"))
    assert not list(cache_dir.glob("encoded/*/.*tmp*"))


def test_empty_splits_are_usage_errors(write_corpus):
    with pytest.raises(UsageError, match="no tokens"):
        load_corpus(cfg(write_corpus("c", train=" \n\n")), "paragraph")
    with pytest.raises(UsageError, match="tokenizes to nothing"):
        load_corpus(cfg(write_corpus("d", train="abc\n", valid="\n \n")), "paragraph")
    with pytest.raises(UsageError, match="no train.txt"):
        resolve_sources(cfg(write_corpus("e", valid="abc\n")))


def test_encode_source_to_file_is_memory_mapped(write_corpus, tmp_path):
    p = write_corpus("t.txt", "abc\n" * 100)
    tok = Tokenizer(level="char", eos="line")
    vocab = Vocab.build(Counter(tok.tokenize("abc\n")))
    st: dict = {}
    ids = encode_source(TextSource(p), tok, vocab, out=tmp_path / "ids.npy", stats=st)
    assert isinstance(ids, np.memmap) and not ids.flags.writeable
    assert st["tokens"] == len(ids) == 400 and st["oov"] == 0
    assert np.load(tmp_path / "ids.npy").tolist() == [EOS_ID] + ids.tolist()  # stored after the start context


def test_progress_bar_only_when_asked_or_big(write_corpus, capsys):
    p = write_corpus("t.txt", "abc\n" * 10)
    tok = Tokenizer(level="char", eos="line")
    vocab = Vocab.build(Counter("abc"))
    encode_source(TextSource(p), tok, vocab)
    assert capsys.readouterr().err == ""  # small file, not a terminal
    encode_source(TextSource(p), tok, vocab, progress=True)
    assert "encoding t.txt" in capsys.readouterr().err


# -- batching ------------------------------------------------------------------------------------

@FAST
@given(st.integers(2, 400), st.integers(1, 9), st.integers(1, 40))
def test_every_token_is_a_target_exactly_once(n, batch, bptt):
    stream = np.arange(n, dtype=np.int64) + 2  # distinct values identify positions
    if (n - 1) // batch < 1:
        with pytest.raises(UsageError, match="too small"):
            batchify(stream, batch)
        return
    x_all, y_all = [], []
    data_ = batchify(stream, batch)
    T, B = data_.shape
    assert B == batch and data_.dtype == torch.int32
    bounds = window_bounds(T - 1, bptt)
    for i in range(len(bounds) - 1):
        x, y = get_window(data_, bounds, i)
        assert x.shape == y.shape and 1 <= x.size(0) <= bptt and x.dtype == torch.int64
        x_all.append(x)
        y_all.append(y)
    x, y = torch.cat(x_all), torch.cat(y_all)  # one pass, windows in order: (T-1, B)
    assert x.size(0) == T - 1
    # targets are the inputs shifted by one, across window boundaries ...
    assert torch.equal(x[1:], y[:-1])
    # ... and across columns: each column continues where the previous one stopped
    assert torch.equal(y[-1, :-1], x[0, 1:])
    # no token lost or duplicated: each stream position after the first is a target once
    targets = sorted((y.flatten() - 2).tolist())
    assert targets == list(range(1, len(targets) + 1))
    assert n - 1 - len(targets) < batch  # only a tail shorter than one row is dropped


def test_with_start_prepends_eos_and_keeps_dtype():
    ids = np.array([5, 6, 7], dtype=np.uint16)
    out = with_start(ids)
    assert out.tolist() == [EOS_ID, 5, 6, 7] and out.dtype == np.uint16
    full = np.array([9, 5, 6, 7], dtype=np.uint16)
    assert with_start(full[1:]).tolist() == [EOS_ID, 5, 6, 7]  # a view after something else: copied


@pytest.mark.parametrize("cache", [True, False])
def test_corpus_splits_get_their_start_context_without_a_copy(write_corpus, cache_dir, cache):
    d = write_corpus("c", train="abc\nab\n", valid="ba\n")
    for _ in range(2):  # encoded, then (with the cache) loaded
        c = load_corpus(cfg(d, cache=cache), "line")
        s = with_start(c.train)
        assert s.tolist() == [EOS_ID] + c.train.tolist()
        assert np.shares_memory(s, c.train)


def test_batchify_of_a_big_stream_is_the_same(monkeypatch):
    ids = np.random.default_rng(0).integers(0, 60000, size=10_001).astype(np.uint16)
    small = batchify(ids, 7)
    monkeypatch.setattr(data, "_PREFAULT_BYTES", 0)  # take the path of >64 MB streams
    big = batchify(ids, 7)
    assert torch.equal(small, big) and big.dtype == torch.int32
    big[0, 0] = 3  # writable


def test_batchify_accepts_memory_mapped_ids(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100, dtype=np.uint16))
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    b = batchify(with_start(mm), 4)
    assert b.shape == (26, 4) and b[0, 0].item() == EOS_ID and b[1, 0].item() == 0


# -- known answers on the shared corpora ---------------------------------------------------------------

SHARED = Path(os.environ.get("RNNLM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def shared(name: str) -> Path:
    p = SHARED / name
    if not (p / "train.txt").is_file() and not (p / "input.txt").is_file():
        pytest.skip(f"shared corpus {p} is absent (set RNNLM_SHARED_DATA to the folder holding ptb/, "
                    f"wikitext-2/, ...; scripts/download_data.py fetches them)")
    return p


def test_ptb_known_answers():
    c = load_corpus(cfg(shared("ptb"), level="word"), "line")
    assert len(c.vocab) == 10_000  # 9,999 words incl. the literal <unk>, plus <eos>
    assert c.vocab.itos[:2] == [UNK, EOS] and "N" in c.vocab
    assert len(c.train) == 929_589
    assert len(c.splits["valid"]) == 73_760 and c.oov["valid"] == 0
    assert len(c.splits["test"]) == 82_430 and c.oov["test"] == 0
    assert c.vocab.counts[0] == 45_020  # the literal <unk> words of train


def test_wikitext2_known_answers():
    c = load_corpus(cfg(shared("wikitext-2"), level="word"), "line")  # empty lines get an <eos> too
    assert len(c.vocab) == 33_278
    assert len(c.train) == 2_088_628
    assert len(c.splits["valid"]) == 217_646 and len(c.splits["test"]) == 245_569
    assert c.oov == {"train": 0, "valid": 0, "test": 0}


def test_ptb_char_known_answers():
    # Mikolov's ptb.char: whitespace-separated symbols, so it is read at word level.
    c = load_corpus(cfg(shared("ptb_char"), level="word"), "line")
    assert len(c.vocab) == 51  # 49 symbols incl. '_', plus <eos> and <unk>
    assert c.vocab.counts[0] == 0 and len(c.train) == 5_017_482
    assert c.oov == {"train": 0, "valid": 0, "test": 0}


def test_tinyshakespeare_known_answers():
    c = load_corpus(cfg(shared("tinyshakespeare") / "input.txt", split=[1.0, 0.0, 0.0]), "none")
    assert len(c.vocab) == 65 + 2 and len(c.train) == 1_115_394


# -- a folder of files (data.glob) -----------------------------------------------------------

def _tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def _whole(srcs: dict[str, TextSource]) -> bytes:
    """The bytes of all the splits, in order (they must tile the concatenation)."""
    out = b""
    for name in ("train", "valid", "test"):
        if name in srcs:
            s = srcs[name]
            with open(s.path, "rb") as f:
                f.seek(s.start)
                out += f.read(s.size())
    return out


def test_glob_concatenates_matching_files_in_path_order(tmp_path, cache_dir):
    root = _tree(tmp_path / "proj", {
        "b/two.py": "def two():\n    return 2\n",
        "a.py": "\ufeffx = 1",                    # a BOM (dropped) and no final newline (one is added)
        "b/sub/three.py": "y = 3\n",
        "notes.md": "# not matched\n",
        ".hidden/four.py": "hidden = 4\n",        # hidden folder: left out
        "b/.five.py": "hidden = 5\n",             # hidden file: left out
        "empty.py": "",                           # nothing to add
        "blob.py": b"\x00\x01binary\n",           # binary: left out, and counted
    })
    srcs, desc = resolve_sources(cfg(root, glob="**/*.py", split=[0.5, 0.25, 0.25]))
    # path order: a.py, b/sub/three.py, b/two.py
    assert _whole(srcs) == b"x = 1\n\ny = 3\n\ndef two():\n    return 2\n"      # a blank line between files
    assert "3 files matching '**/*.py'" in desc and "(1 binary file and 1 blank file left out)" in desc
    # a pattern without ** stays at the top
    srcs, desc = resolve_sources(cfg(root, glob="*.py"))
    assert _whole(srcs) == b"x = 1\n" and desc.startswith("1 file matching")


def test_glob_result_is_reused_until_a_file_changes(tmp_path, cache_dir):
    root = _tree(tmp_path / "proj", {"a.txt": "alpha\n", "b.txt": "beta\n"})
    c = cfg(root, glob="*.txt")
    p1 = resolve_sources(c)[0]["train"].path
    body = p1.read_bytes()
    for f in (p1, p1.with_suffix(".json")):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    assert resolve_sources(c)[0]["train"].path == p1 and p1.read_bytes() == body        # reused, not rewritten,
    assert p1.stat().st_mtime > 1e9 and p1.with_suffix(".json").stat().st_mtime > 1e9   # and marked as used now
    (root / "b.txt").write_text("beta, longer now\n")
    p2 = resolve_sources(c)[0]["train"].path
    assert p2 != p1 and b"beta, longer now" in _whole(resolve_sources(c)[0])
    _tree(root, {"c.txt": "gamma\n"})       # a new file is a change too
    assert b"gamma" in _whole(resolve_sources(c)[0])
    # an edit that keeps the size and the modification time (cp -p, rsync -a, touch -d) is seen too
    st = (root / "a.txt").stat()
    (root / "a.txt").write_text("ALPHA\n")
    os.utime(root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (root / "a.txt").stat().st_mtime_ns == st.st_mtime_ns and (root / "a.txt").stat().st_size == st.st_size
    assert b"ALPHA" in _whole(resolve_sources(c)[0])


def test_glob_leaves_the_cache_folder_out(tmp_path, monkeypatch):
    root = _tree(tmp_path / "proj", {"a.txt": "alpha\n"})
    monkeypatch.setenv("RNNLM_CACHE", str(root / "cache"))    # a cache inside the folder being read
    resolve_sources(cfg(root, glob="**/*.txt"))
    assert list((root / "cache" / "corpora").glob("*.txt"))
    srcs, desc = resolve_sources(cfg(root, glob="**/*"))       # would match the cached concatenation
    assert _whole(srcs) == b"alpha\n" and desc.startswith("1 file matching")


@pytest.mark.parametrize("setup, pattern, message", [
    ({"a.txt": "x\n"}, "*.md", "no files under"),
    ({"a.txt": "x\n"}, "", "data.glob is empty"),
    ({"a.txt": "x\n"}, "/etc/*.conf", "not a usable pattern"),
    ({"a.bin": b"\x00\x00"}, "*", "hold no text"),
    ({"a.txt": "ok\n", "b.txt": b"caf\xe9\n"}, "*.txt", "b.txt: invalid utf-8 at line 1, byte offset 3"),
])
def test_glob_bad_cases_are_usage_errors(tmp_path, cache_dir, setup, pattern, message):
    root = _tree(tmp_path / "proj", setup)
    with pytest.raises(UsageError, match=message):
        resolve_sources(cfg(root, glob=pattern))
    assert not list(cache_dir.glob("corpora/*.tmp*"))   # nothing half-written left behind


def test_glob_decodes_with_data_errors_and_encoding(tmp_path, cache_dir):
    root = _tree(tmp_path / "proj", {"b.txt": b"caf\xe9\n"})
    assert _whole(resolve_sources(cfg(root, glob="*.txt", errors="replace"))[0]) == b"caf\xe9\n"
    assert _whole(resolve_sources(cfg(root, glob="*.txt", encoding="latin-1"))[0]) == b"caf\xe9\n"


def test_glob_needs_a_directory_and_a_plain_directory_suggests_it(tmp_path, cache_dir):
    f = _tree(tmp_path, {"one.txt": "x\n"}) / "one.txt"
    with pytest.raises(UsageError, match="needs data.path to be a directory"):
        resolve_sources(cfg(f, glob="*.txt"))
    c = DataConfig(path=None, glob="*.txt")
    with pytest.raises(UsageError, match="needs data.path"):
        resolve_sources(c)
    with pytest.raises(UsageError, match=r"data.glob='\*\*/\*.py'"):
        resolve_sources(cfg(tmp_path))     # a directory without train.txt


def test_glob_corpus_trains_end_to_end(tmp_path, cache_dir):
    from rnnlm.config import build_config
    from rnnlm.train import Trainer
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(200))
    root = _tree(tmp_path / "proj", {"pkg/a.py": text, "pkg/b.py": text[::-1], "README.md": "readme\n"})
    c = build_config(None, [f"data.path={root}", "data.glob=**/*.py", "model.hidden_size=16",
                            "model.embedding_size=8", "model.num_layers=1", "train.batch_size=4", "train.bptt=16",
                            "train.max_steps=3", "train.eval_every=null"])
    tr = Trainer(c, run_dir=tmp_path / "run")
    tr.progress_enabled = False
    end = tr.fit()
    assert end["step"] == 3 and end["best_valid_loss"] is not None
    assert "r" in tr.vocab and "#" not in tr.vocab   # README.md was not read (its '#' never seen)


def test_glob_reads_files_in_blocks(tmp_path, cache_dir, monkeypatch):
    """Files are checked and copied block by block: the results must not depend on where the blocks fall."""
    monkeypatch.setattr(data, "_READ_HINT", 5)   # blocks cut through lines and through multi-byte characters
    text = "αβγ δεζ\nline two ηθ\nend"
    root = _tree(tmp_path / "proj", {
        "a.txt": "\ufeff" + text,
        "b.txt": "x" * 23 + "\x00tail\n",      # a NUL only in a late block: still binary
    })
    srcs, desc = resolve_sources(cfg(root, glob="*.txt"))
    assert _whole(srcs) == (text + "\n").encode("utf-8") and "(1 binary file left out)" in desc
    (root / "c.txt").write_bytes("ok\nok\nok\nnot \xff ok\n".replace("\xff", "").encode() + b"\n\xc3(\n")
    with pytest.raises(UsageError, match=r"c.txt: invalid utf-8 at line 6, byte offset 18 \(bytes c3"):
        resolve_sources(cfg(root, glob="*.txt"))
    (root / "c.txt").write_bytes("ends inside é".encode("utf-8")[:-1])      # a truncated last character
    with pytest.raises(UsageError, match="c.txt: invalid utf-8 at its end"):
        resolve_sources(cfg(root, glob="*.txt"))


def test_glob_deletes_an_older_text_only_when_unused_for_a_day(tmp_path, cache_dir):
    """Another process may still be reading an older gathered text (it reads it while it starts): the
    clean-up waits until nobody has gathered or reused it for STALE_AFTER_S."""
    root = _tree(tmp_path / "proj", {"a.txt": "alpha\n"})
    c = cfg(root, glob="*.txt")
    p1 = resolve_sources(c)[0]["train"].path
    (root / "a.txt").write_text("alpha, edited\n")
    p2 = resolve_sources(c)[0]["train"].path
    assert p2 != p1 and p1.exists() and p1.with_suffix(".json").exists()    # used a moment ago: kept
    day_ago = time.time() - data.STALE_AFTER_S - 60
    for f in (p1, p1.with_suffix(".json")):
        os.utime(f, (day_ago, day_ago))
    killed = cache_dir / "corpora" / f".{p1.stem.rsplit('-', 1)[0]}-123-abc.tmp"   # left by a killed process
    killed.write_bytes(b"half")
    os.utime(killed, (day_ago, day_ago))
    assert resolve_sources(c)[0]["train"].path == p2                        # a reuse cleans up too
    assert not p1.exists() and not p1.with_suffix(".json").exists() and not killed.exists() and p2.exists()


def test_a_split_share_below_one_line_warns_and_a_min_freq_above_every_count_is_refused(tmp_path, cache_dir):
    p = tmp_path / "c.txt"
    p.write_text("the cat sat on the mat\n" * 400)
    with pytest.warns(UserWarning, match="the valid split 0.001 of the text .* no valid split"):
        srcs = split_file(p, [0.999, 0.001, 0.0])
    assert set(srcs) == {"train"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(split_file(p, [0.9, 0.1, 0.0])) == {"train", "valid"}   # a zero share: no warning
    with pytest.raises(UsageError, match=r"data.min_freq=1000 leaves no token .* occurs 400 times"):
        load_corpus(cfg(p, level="word", min_freq=1000, split=[0.5, 0.5, 0.0]), "line")


def test_encoded_entries_of_cleaned_up_gathered_texts_are_deleted_too(tmp_path, cache_dir):
    """Each edit of a data.glob folder makes a gathered text and an encoded-ids entry; once the old
    text is cleaned up (a day unused) and the entry is unused for a day too, the entry goes -- but not
    an entry of a plain file (even one deleted since), nor one of a gathered text that still exists,
    nor one that another source hit recently (the key is the content, not the name)."""
    root = _tree(tmp_path / "proj", {"a.txt": "alpha beta gamma\n" * 40})
    plain = _tree(tmp_path / "plain", {"p.txt": "delta epsilon\n" * 40}) / "p.txt"
    c = cfg(root, glob="*.txt", level="word")
    first = load_corpus(c, "line")
    p1 = first.cache_dir
    old_text = resolve_sources(c)[0]["train"].path
    keep_plain = load_corpus(cfg(plain, level="word"), "line").cache_dir
    gone = _tree(tmp_path / "gone", {"g.txt": "zeta eta\n" * 40}) / "g.txt"
    keep_gone = load_corpus(cfg(gone, level="word"), "line").cache_dir
    gone.unlink()  # a user's file deleted: its entry stays (a renamed copy of it would hit it)
    (root / "a.txt").write_text("alpha beta gamma, edited\n" * 40)
    second = load_corpus(c, "line")
    assert second.cache_dir != p1 and p1.is_dir()
    day_ago = time.time() - data.STALE_AFTER_S - 60
    for f in (old_text, old_text.with_suffix(".json"), p1 / "manifest.json", keep_plain / "manifest.json",
              keep_gone / "manifest.json"):
        os.utime(f, (day_ago, day_ago))
    same = tmp_path / "same.txt"                   # a user's file with the old text's bytes hits its entry,
    same.write_bytes(old_text.read_bytes())
    hit = load_corpus(cfg(same, level="word"), "line")
    assert hit.cached and hit.cache_dir == p1       # which marks it as used:
    load_corpus(c, "line")                         # the reuse cleans up the old text, but not the entry
    assert not old_text.exists() and (p1 / "manifest.json").is_file()
    os.utime(p1 / "manifest.json", (day_ago, day_ago))
    load_corpus(c, "line")                         # a day unused: the entry goes too
    assert not p1.exists() and not list((cache_dir / "encoded").glob(".deleting-*"))
    assert (keep_plain / "manifest.json").is_file() and (second.cache_dir / "manifest.json").is_file()
    assert (keep_gone / "manifest.json").is_file()
    # an old entry whose gathered text still exists stays
    os.utime(second.cache_dir / "manifest.json", (day_ago, day_ago))
    load_corpus(c, "line")
    assert (second.cache_dir / "manifest.json").is_file()
    assert load_corpus(c, "line").cached           # and is used


def test_glob_leaves_run_directories_out_and_finds_data_inside_the_cache_root(tmp_path, monkeypatch):
    top = tmp_path / "scratch"
    monkeypatch.setenv("RNNLM_CACHE", str(top))     # cache and data side by side, as on a cluster's $SCRATCH
    root = _tree(top / "src", {"a.txt": "alpha\n", "runs/r1/config.yaml": "model: {}\n",
                               "runs/r1/metrics.jsonl": "{}\n", "runs/r1/vocab.json": "{}\n",
                               "notes/config.yaml": "kept: true\n"})   # config.yaml alone is not a run
    srcs, desc = resolve_sources(cfg(root, glob="**/*"))
    assert _whole(srcs) == b"alpha\n\nkept: true\n" and desc.startswith("2 files matching")
    srcs, _ = resolve_sources(cfg(root, glob="**/*"))   # again: its own gathered text (under $RNNLM_CACHE) stays out
    assert _whole(srcs) == b"alpha\n\nkept: true\n"


def test_glob_odd_places_and_damage(tmp_path, cache_dir):
    root = _tree(tmp_path / "proj", {"a.txt": "alpha\n", "top.txt": "x\n"})
    with pytest.raises(UsageError, match="cannot write the gathered text"):    # a cache "folder" under a file
        resolve_sources(cfg(root, glob="*.txt", cache_dir=str(root / "top.txt" / "cache")))
    odd = tmp_path / os.fsdecode(b"bad\xffname")                               # a folder name that is not UTF-8
    _tree(odd, {"a.txt": "alpha\n"})
    assert _whole(resolve_sources(cfg(odd, glob="*.txt"))[0]) == b"alpha\n"
    p = resolve_sources(cfg(root, glob="*.txt"))[0]["train"].path
    p.with_suffix(".json").write_text("[]")                                    # valid JSON, wrong shape
    srcs, desc = resolve_sources(cfg(root, glob="*.txt"))
    assert _whole(srcs) == b"alpha\n\nx\n" and desc.startswith("2 files")
    assert not list(cache_dir.glob("corpora/.*tmp*")) and not list(cache_dir.glob("corpora/*.tmp*"))


def test_glob_pattern_hints_and_the_train_txt_warning(tmp_path, cache_dir):
    root = _tree(tmp_path / "proj", {"sub/a.txt": "alpha\n", "train.txt": "the old split\n"})
    with pytest.raises(UsageError, match=r"leaves the data directory"):
        resolve_sources(cfg(root / "sub", glob="../*.txt"))
    with pytest.raises(UsageError, match=r"'\*\*' alone matches folders: '\*\*/\*' matches every file"):
        resolve_sources(cfg(root, glob="**"))
    with pytest.warns(UserWarning, match="holds train.txt, but data.glob is set"):
        srcs, _ = resolve_sources(cfg(root, glob="**/*.txt"))
    assert _whole(srcs) == b"alpha\n\nthe old split\n"


def test_a_file_name_that_is_not_utf8_is_cached_and_read_back(tmp_path, cache_dir):
    try:
        p = tmp_path / os.fsdecode(b"bad\xffname.txt")
        p.write_text("hello world\n" * 50, encoding="utf-8")
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take a name that is not UTF-8")
    first = load_corpus(cfg(p), "line")           # writes the cache manifest (which names the file)
    again = load_corpus(cfg(p), "line")
    assert again.cached and np.array_equal(np.asarray(first.train), np.asarray(again.train))
