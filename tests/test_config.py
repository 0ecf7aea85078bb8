"""Config: defaults, YAML files, dotted overrides, validation, and fuzzing of the parsers."""

from __future__ import annotations

import dataclasses
import math
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnlm.config import (SECTION_CLASSES, Config, all_keys, apply_dict, build_config, config_from_dict,
                          dump_yaml, load_yaml, parse_override)
from rnnlm.errors import UsageError


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# -- defaults and layering -------------------------------------------------------------------

def test_defaults_are_the_dataclass_defaults():
    cfg = build_config()
    assert cfg == Config()
    assert cfg.data.level == "char" and cfg.data.split == [0.9, 0.05, 0.05] and cfg.data.path is None
    assert cfg.model.cell == "lstm" and cfg.model.num_layers >= 1
    assert cfg.train.optimizer in ("sgd", "adam", "adamw")
    assert set(cfg.to_dict()) == {"data", "model", "train", "sample"}
    assert cfg.resolved_eos() == "paragraph"
    assert build_config(overrides=["data.level=word"]).resolved_eos() == "line"


def test_default_lists_are_not_shared():
    a, b = Config(), Config()
    a.data.split[0] = 0.5
    assert b.data.split[0] == 0.9


def test_yaml_states_only_what_differs(tmp_path):
    p = write(tmp_path, "model:\n  hidden_size: 64\ntrain:\n  lr: 0.5\n  optimizer: sgd\n", "small.yaml")
    cfg = build_config(p)
    assert cfg.model.hidden_size == 64 and cfg.train.lr == 0.5 and cfg.train.optimizer == "sgd"
    d = Config()
    assert cfg.model.num_layers == d.model.num_layers and cfg.data == d.data
    assert cfg.name == "small"  # the file's stem names the run


def test_empty_yaml_and_empty_sections_mean_defaults(tmp_path):
    assert build_config(write(tmp_path, "")).to_dict() == Config().to_dict()
    assert build_config(write(tmp_path, "model:\ntrain: {}\n")).to_dict() == Config().to_dict()


def test_overrides_win_over_the_file(tmp_path):
    p = write(tmp_path, "model: {hidden_size: 64}\n")
    cfg = build_config(p, ["model.hidden_size=32", "model.hidden_size=16"])
    assert cfg.model.hidden_size == 16


def test_the_top_level_name_is_an_override_too(tmp_path):
    """`name` is the one key outside the sections (YAML `name:`; runs/<name>-<time>): KEY=VALUE sets it
    as written, wins over the file's, and an empty one is refused."""
    p = write(tmp_path, "name: from-file\nmodel: {hidden_size: 64}\n")
    assert build_config(p, ["name=mine"]).name == "mine"
    assert build_config(None, ["name=2024"]).name == "2024"   # text, not YAML's number
    with pytest.raises(UsageError, match="'name' must be a non-empty string"):
        build_config(None, ["name="])


@pytest.mark.parametrize("item, key, value", [
    ("model.hidden_size=650", "model.hidden_size", 650),
    ("train.lr=0.5", "train.lr", 0.5),
    ("train.lr=1e-3", "train.lr", 1e-3),          # YAML 1.1 reads this as a string; accepted as a number
    ("train.lr=2", "train.lr", 2.0),
    ("train.max_steps=null", "train.max_steps", None),
    ("train.max_steps=", "train.max_steps", None),
    ("data.split=[0.8, 0.1, 0.1]", "data.split", [0.8, 0.1, 0.1]),
    ("data.lowercase=true", "data.lowercase", True),
    ("model.tie_weights=false", "model.tie_weights", False),
    ("data.path=corpus dir/train text.txt", "data.path", "corpus dir/train text.txt"),
    ("data.path=2024", "data.path", "2024"),      # a path YAML reads as a number stays text
    ("train.out=runs/x=1", "train.out", "runs/x=1"),
    ("data.level=word", "data.level", "word"),
    ("sample.prime=  hello", "sample.prime", "hello"),
    ("model.adaptive_cutoffs=[10, 100]", "model.adaptive_cutoffs", [10, 100]),
    (" model.num_layers = 3 ", "model.num_layers", 3),
])
def test_overrides_parse_as_yaml_scalars(item, key, value):
    cfg = build_config(overrides=[item])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


def test_parse_override_returns_key_and_yaml_value():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=[1, x]") == ("a.b", [1, "x"])
    assert parse_override("a.b={unclosed") == ("a.b", "{unclosed")  # not YAML: plain text
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


@pytest.mark.parametrize("value", ["2020-13-45", "!!timestamp x", "!!int z", "!!float q", "!!binary x", "[" * 3000,
                                   "!!python/object/apply:os.system ['true']", "&a [*a]", "1" * 5000])
@pytest.mark.parametrize("key", ["train.out", "train.lr", "model.hidden_size", "data.split", "model.cell"])
def test_values_yaml_cannot_construct_give_a_config_or_a_usage_error(key, value):
    """Found by the fuzzer: YAML that parses but cannot be constructed (ValueError, AttributeError,
    RecursionError) must not escape as an unhandled exception."""
    try:
        cfg = build_config(overrides=[f"{key}={value}"])
    except UsageError as e:
        assert key in str(e) and len(str(e)) < 1000
    else:
        assert cfg.train.out == value.strip() or key != "train.out"


@pytest.mark.parametrize("item", ["model.hidden_size", "=5", "  =5", ""])
def test_malformed_override_is_a_usage_error(item):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        build_config(overrides=[item])


# -- unknown keys name the closest valid one ---------------------------------------------------

@pytest.mark.parametrize("item, suggestion", [
    ("model.hiden_size=3", "model.hidden_size"),
    ("train.learning_rate=3", "train.lr"),
    ("modle.hidden_size=3", "model.hidden_size"),
    ("trian.lr=3", "train.lr"),
    ("data.levle=word", "data.level"),
])
def test_unknown_key_names_the_closest(item, suggestion):
    with pytest.raises(UsageError) as e:
        build_config(overrides=[item])
    assert "unknown" in str(e.value) and f"'{suggestion}'" in str(e.value)


def test_section_without_key_and_too_deep_keys():
    with pytest.raises(UsageError, match="is a config section"):
        build_config(overrides=["model=3"])
    with pytest.raises(UsageError, match="unknown config key 'model.hidden_size.x'"):
        build_config(overrides=["model.hidden_size.x=3"])


def test_unknown_section_and_key_in_yaml(tmp_path):
    with pytest.raises(UsageError) as e:
        build_config(write(tmp_path, "modle:\n  hidden_size: 3\n"))
    assert "unknown config section 'modle'" in str(e.value) and "'model'" in str(e.value)
    assert "cfg.yaml" in str(e.value)
    with pytest.raises(UsageError) as e:
        build_config(write(tmp_path, "train:\n  bpt: 3\n"))
    assert "'train.bptt'" in str(e.value)


def test_yaml_structure_errors(tmp_path):
    with pytest.raises(UsageError, match="top level must be a mapping"):
        build_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UsageError, match="section 'model' must be a mapping"):
        build_config(write(tmp_path, "model: 3\n"))
    with pytest.raises(UsageError, match="'name'"):
        build_config(write(tmp_path, "name: [1, 2]\n"))
    assert build_config(write(tmp_path, "name: mine\n", "other.yaml")).name == "mine"


# -- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, words", [
    ("model.hidden_size=abc", "an integer"),
    ("model.hidden_size=2.5", "an integer"),
    ("model.hidden_size=true", "an integer"),
    ("train.lr=fast", "a number"),
    ("train.lr=.nan", "finite"),
    ("train.lr=.inf", "finite"),
    ("train.lr=1" + "0" * 400, "finite"),
    ("data.lowercase=maybe", "true or false"),
    ("data.lowercase=1", "true or false"),
    ("data.split=0.5", "a list"),
    ("data.split=[a, b, c]", "a number"),
    ("data.path=[1, 2]", "a string"),
    ("data.path={a: 1}", "a string"),
])
def test_wrong_types(item, words):
    key = item.split("=")[0]
    with pytest.raises(UsageError) as e:
        build_config(overrides=[item])
    assert f"'{key}" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("item", [
    "model.hidden_size=0", "model.hidden_size=-5", "model.embedding_size=0", "model.num_layers=0",
    "train.batch_size=0", "train.batch_size=-1", "train.bptt=0", "train.epochs=0", "train.max_steps=0",
    "train.max_steps=-10", "train.lr=0", "train.lr=-0.1", "train.max_time=0", "train.clip_grad_norm=-1",
    "train.log_every=0", "train.eval_every=-1", "train.save_every=0", "data.min_freq=0", "data.max_vocab=2",
    "sample.max_length=-1", "sample.num_samples=-1", "sample.top_k=-1", "sample.temperature=-0.5",
    "model.head_layers=-1", "train.early_stopping_patience=0",
])
def test_negative_or_zero_sizes(item):
    key = item.split("=")[0]
    with pytest.raises(UsageError, match=f"'{key}' must be"):
        build_config(overrides=[item])


@pytest.mark.parametrize("item", ["model.dropout=1.5", "model.dropout=-0.1", "sample.top_p=1.01",
                                  "sample.top_p=0", "sample.top_p=-1"])
def test_probabilities_outside_unit_interval(item):
    key = item.split("=")[0]
    with pytest.raises(UsageError, match=f"'{key}'"):
        build_config(overrides=[item])


@pytest.mark.parametrize("item", ["data.split=[0.5, 0.5]", "data.split=[0.5, 0.6, -0.1]", "data.split=[0.5, 0.2, 0.2]",
                                  "data.split=[0, 0.5, 0.5]", "data.split=[1.5, -0.25, -0.25]"])
def test_bad_split(item):
    with pytest.raises(UsageError, match="data.split"):
        build_config(overrides=[item])


def test_edge_values_are_valid():
    cfg = build_config(overrides=["model.dropout=0", "model.dropout=1", "sample.top_p=1", "sample.temperature=0",
                                  "data.split=[1, 0, 0]", "sample.max_length=0", "train.clip_grad_norm=null"])
    assert cfg.model.dropout == 1.0 and cfg.sample.top_p == 1.0 and cfg.train.clip_grad_norm is None


@pytest.mark.parametrize("item, choice", [
    ("model.cell=lstmm", "lstm"), ("model.cell=transformer", None), ("train.optimizer=adamm", "adam"),
    ("train.optimizer=rmsprop", None), ("train.lr_schedule=cosin", "cosine"), ("train.precision=fp8", None),
    ("train.precision=bf61", None), ("data.level=words", "word"), ("data.eos=lines", "line"),
    ("model.softmax=sampled", None),
])
def test_unknown_choice(item, choice):
    key = item.split("=")[0]
    with pytest.raises(UsageError) as e:
        build_config(overrides=[item])
    msg = str(e.value)
    assert f"'{key}' must be one of" in msg
    if choice:
        assert f"did you mean '{choice}'" in msg


def test_cross_key_rules():
    with pytest.raises(UsageError, match="tie_weights"):
        build_config(overrides=["model.softmax=adaptive", "model.tie_weights=true"])
    with pytest.raises(UsageError, match="adaptive_cutoffs"):
        build_config(overrides=["model.adaptive_cutoffs=[100, 10]"])
    with pytest.raises(UsageError, match="fp16"):
        build_config(overrides=["train.precision=fp16", "train.device=cpu"])


# -- files -------------------------------------------------------------------------------------

def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        build_config(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="is a directory"):
        build_config(tmp_path)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "model:\n  hidden_size: 64\n  cell: [lstm\ntrain:\n  lr: 1\n")
    with pytest.raises(UsageError) as e:
        build_config(p)
    msg = str(e.value)
    assert "YAML syntax error" in msg and str(p) in msg
    assert "line 4" in msg and "column" in msg and "needs quotes" not in msg


def test_override_values_starting_with_yaml_anchor_or_alias_stay_text():
    assert build_config(None, ["data.glob=**/*.py"]).data.glob == "**/*.py"
    assert build_config(None, ["data.glob=&x"]).data.glob == "&x"          # YAML alone reads null
    assert build_config(None, ["data.glob=*.txt"]).data.glob == "*.txt"


def test_unquoted_glob_pattern_gets_a_quoting_hint(tmp_path):
    with pytest.raises(UsageError, match=r"line 2.*needs quotes in YAML, e.g. glob: '\*\*/\*.py'"):
        build_config(write(tmp_path, "data:\n  glob: **/*.py\n"))
    assert build_config(write(tmp_path, "data:\n  glob: '**/*.py'\n")).data.glob == "**/*.py"


def test_yaml_tab_indentation_error(tmp_path):
    p = write(tmp_path, "model:\n\thidden_size: 64\n")
    with pytest.raises(UsageError, match=r"line 2, column 1"):
        build_config(p)


@pytest.mark.parametrize("text", ["x: !!python/object/apply:os.system ['true']\n", "x: !!timestamp 2020-13-45\n",
                                  "x: !!int abc\n", "[" * 5000, "a: 1\n---\nb: 2\n"])
def test_hostile_or_odd_yaml_is_a_usage_error(tmp_path, text):
    with pytest.raises(UsageError):
        build_config(write(tmp_path, text))


def test_non_utf8_config(tmp_path):
    p = tmp_path / "latin.yaml"
    p.write_bytes(b"model:\n  cell: l\xe9stm\n")
    with pytest.raises(UsageError, match="UTF-8"):
        build_config(p)


def test_load_yaml_accepts_bom(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes("\ufefftrain: {lr: 0.25}\n".encode("utf-8"))
    assert load_yaml(p) == {"train": {"lr": 0.25}}


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(overrides=["data.level=word", "data.split=[0.8, 0.1, 0.1]", "model.hidden_size=77",
                                  "train.max_steps=null", "data.path=2024", "sample.prime=Once upon",
                                  "model.adaptive_cutoffs=[5, 50]", "model.softmax=adaptive", "train.lr=1e-4"])
    cfg.name = "round"
    text = dump_yaml(cfg)
    p = write(tmp_path, text, "round.yaml")
    again = build_config(p)
    assert again == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg
    # the dump states every key of every section
    loaded = yaml.safe_load(text)
    assert sorted(f"{s}.{k}" for s in SECTION_CLASSES for k in loaded[s]) == sorted(all_keys())


def test_config_from_dict_validates_saved_configs():
    d = Config().to_dict()
    d["model"]["hidden_size"] = -1
    with pytest.raises(UsageError, match="saved config"):
        config_from_dict(d)


# -- fuzzing: any input gives a valid Config or a UsageError, nothing else -----------------------

KEYS = all_keys()
key_text = st.one_of(st.sampled_from(KEYS), st.text(max_size=30),
                     st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(list(SECTION_CLASSES) + ["x", ""]),
                               st.text(string.ascii_lowercase + "_.", max_size=15)))
value_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["null", "~", "true", "no", "0", "-1", "1e-3", "1.0e+400", ".nan", "-.inf", "[1, 2", "{a: b}",
                     "[0.9, 0.05, 0.05]", "2020-13-45", "!!timestamp x", "!!int z", "!!binary x", "&a [*a]",
                     "!!python/name:os.system", "'quoted'", "\"\\u00e9\"", "0x1F", "1_000", "1:30", "[" * 200,
                     "lstm", "word", "cosine", "bf16", "?", "- a", "|\n x", "*alias", "!!set {a}"]),
    st.integers().map(str), st.floats(allow_nan=True).map(repr),
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=80))
def test_fuzz_parse_override_arbitrary_text(text):
    try:
        key, _ = parse_override(text)
    except UsageError:
        return
    assert isinstance(key, str) and key and "=" not in key


@FUZZ
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", key_text, value_text), max_size=4))
def test_fuzz_build_config_overrides(items):
    try:
        cfg = build_config(overrides=items)
    except UsageError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)
    _assert_valid(cfg)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                         st.sampled_from(["lstm", "gru", "word", "char", "adam", "sgd", "cosine", "fp32", "line"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3)),
                           max_leaves=10)
section_names = st.one_of(st.sampled_from(list(SECTION_CLASSES) + ["name"]), st.text(max_size=8), st.integers(),
                          st.none())
field_names = st.one_of(st.sampled_from(sorted({k.split(".")[1] for k in KEYS})), st.text(max_size=10),
                        st.integers(), st.booleans())
config_dicts = st.one_of(
    yaml_values,
    st.dictionaries(section_names, st.one_of(yaml_values, st.dictionaries(field_names, yaml_values, max_size=5)),
                    max_size=5),
)


@FUZZ
@given(config_dicts)
def test_fuzz_apply_dict(data):
    cfg = Config()
    try:
        apply_dict(cfg, data, "fuzz.yaml")
        config_from_dict(data if isinstance(data, dict) else {})
    except UsageError as e:
        assert str(e)
        return
    for section in SECTION_CLASSES:
        for f in dataclasses.fields(SECTION_CLASSES[section]):
            v = getattr(getattr(cfg, section), f.name)
            assert v is None or isinstance(v, (str, bool, int, float, list))


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_yaml_files(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "f.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = build_config(p)
    except UsageError:
        return
    _assert_valid(cfg)


def _assert_valid(cfg: Config) -> None:
    """A Config that passed validation satisfies the rules the rest of rnnlm relies on."""
    assert cfg.model.hidden_size >= 1 and cfg.model.embedding_size >= 1 and cfg.model.num_layers >= 1
    assert 0 <= cfg.model.dropout <= 1 and 0 < cfg.sample.top_p <= 1
    assert cfg.train.batch_size >= 1 and cfg.train.bptt >= 1 and cfg.train.lr > 0 and math.isfinite(cfg.train.lr)
    assert cfg.model.cell in ("rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_peephole")
    assert cfg.train.optimizer in ("sgd", "adam", "adamw") and cfg.train.precision in ("fp32", "bf16", "fp16")
    assert len(cfg.data.split) == 3 and abs(sum(cfg.data.split) - 1) < 1e-6
    assert cfg.data.path is None or isinstance(cfg.data.path, str)
    # and it survives a round trip through its own YAML
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_beta2_must_lie_in_0_1(value):
    with pytest.raises(UsageError, match="train.beta2"):
        build_config(None, [f"train.beta2={value}"])


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_beta2_reaches_the_optimizer(opt):
    import torch
    from rnnlm.train import build_optimizer
    cfg = build_config(None, [f"train.optimizer={opt}", "train.beta2=0.99"])
    o = build_optimizer(torch.nn.Linear(2, 2), cfg.train)
    assert o.param_groups[0]["betas"] == (0.9, 0.99)


def test_train_device_takes_a_gpu_index():
    assert build_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    for bad in ("gpu", "cuda:", "cuda:x", "0", "CPU"):
        with pytest.raises(UsageError, match="train.device' must be auto, cpu, cuda, cuda:N or mps"):
            build_config(None, [f"train.device={bad}"])


# -- --print-config ---------------------------------------------------------------------------

def _reload(tmp_path, text: str) -> Config:
    p = tmp_path / "printed.yaml"
    p.write_text(text, encoding="utf-8")
    cfg = build_config(p)
    return cfg


def test_commented_yaml_lists_every_key_with_its_help_and_loads_back(tmp_path):
    from rnnlm.config import commented_yaml, describe_keys
    cfg = build_config(None, ["model.hidden_size=77", "data.split=[0.8, 0.1, 0.1]", "train.max_time=12.5",
                              "data.max_vocab=null", "train.device=cuda:1"])
    cfg.name = "exp"
    text = commented_yaml(cfg)
    for key, _, help_text in describe_keys():
        section, name = key.split(".")
        assert any(line.startswith(f"  {name}: ") and line.endswith(f"# {help_text}") for line in text.splitlines()), key
    back = _reload(tmp_path, text)
    assert back.to_dict() == cfg.to_dict() and back.name == "exp"
    assert "  hidden_size: 77 " in text and "  split: [0.8, 0.1, 0.1] " in text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prime=st.text(max_size=30) | st.text(alphabet="\n\r\x0b\x0c\x1c\x85\u2028\u2029\t\x00 '\"#:ab", max_size=12))
def test_commented_yaml_round_trips_any_prime(tmp_path, prime):
    """Strings with quotes, '#', line breaks (\\n, \\r, U+2028, NEL) or emoji stay one line and load back."""
    from rnnlm.config import commented_yaml
    cfg = Config()
    cfg.sample.prime = prime
    text = commented_yaml(cfg)
    assert len(text.splitlines()) == 1 + 4 + len(all_keys())   # each key on one line, by any line-break rule
    assert _reload(tmp_path, text).sample.prime == prime
