"""Configuration: one dataclass per section, YAML loading, dotted overrides, validation.

Defaults live here; a YAML file states only what differs, and ``KEY=VALUE`` overrides
(``model.hidden_size=650``) are applied last. Values are parsed as YAML scalars, so
``train.max_steps=null`` and ``data.split=[0.8,0.1,0.1]`` work. Every value is checked
against its field's type and range; an unknown key names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

SECTIONS = ("data", "model", "train", "sample")


# The seeds torch.manual_seed accepts, and a bound on sample counts and lengths (beyond it, PyTorch
# cannot index the result anyway).
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
COUNT_MAX = 2 ** 31 - 1
LAYERS_MAX = 1024  # a guard against typos (a 10**20-layer model would be built for ever), not a design limit
STATE_RESETS_MIN_BATCH = 16  # train.state_resets=null turns resets on from this batch size (each column keeps
                             # at least 16 windows of context between its resets)


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with a help text and validation rules in its metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class DataConfig:
    path: str | None = _f(None, "text file (split by `split`) or directory with train.txt [valid.txt test.txt]; "
                                "null = the embedded default corpus (the Python standard library's source)")
    glob: str | None = _f(None, "with a directory as `path`: train on every file under it matching this pattern "
                                "('**/*.py': all Python files, in subfolders too), concatenated in path order and "
                                "split by `split`; hidden, binary and blank files and run directories are left out. "
                                "null = the directory holds train.txt [valid.txt test.txt]")
    split: list[float] = _f([0.9, 0.05, 0.05], "train/valid/test fractions for a single file (or `glob`'s files), "
                                               "cut at line boundaries")
    level: str = _f("char", "token level", choices=("char", "word"))
    lowercase: bool = _f(False, "lowercase the text before tokenizing")
    min_freq: int = _f(1, "tokens seen fewer times in train become <unk>", min=1)
    max_vocab: int | None = _f(None, "cap on the vocabulary size, specials included", min=3)
    eos: str = _f("auto", "where <eos> goes: after each line, after each blank-line separated paragraph, nowhere; "
                          "auto = line for words, paragraph for chars", choices=("auto", "line", "paragraph", "none"))
    tokenizer: str = _f("whitespace", "word tokenizer: whitespace (PTB-compatible) or simple (splits punctuation)",
                        choices=("whitespace", "simple"))
    normalize: str | None = _f(None, "Unicode normalisation applied before tokenizing", choices=(None, "NFC", "NFKC"))
    encoding: str = _f("utf-8", "text encoding of the corpus files")
    errors: str = _f("strict", "what to do with undecodable bytes", choices=("strict", "replace", "ignore"))
    cache: bool = _f(True, "reuse encoded ids cached on disk (keyed by file contents and tokenizer settings); "
                           "false = always encode in memory")
    cache_dir: str | None = _f(None, "where encoded ids (and the text data.glob gathers) are cached; null = "
                                     "$RNNLM_CACHE or ~/.cache/rnnlm")


@dataclass
class ModelConfig:
    cell: str = _f("lstm", "recurrent cell",
                   choices=("rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_peephole"))
    embedding_size: int = _f(128, "token embedding size", min=1, max=COUNT_MAX)
    hidden_size: int = _f(256, "recurrent state size a<t> (and c<t>)", min=1, max=COUNT_MAX)
    num_layers: int = _f(2, "stacked recurrent layers", min=1, max=LAYERS_MAX)
    dropout: float = _f(0.0, "dropout on embeddings, between layers and before the softmax (each site's own "
                             "key below, when set, overrides it there)", prob=True)
    dropout_input: float | None = _f(None, "dropout on the embedding outputs fed to the first layer; null = "
                                           "model.dropout (AWD-LSTM's dropouti)", prob=True)
    dropout_hidden: float | None = _f(None, "dropout between recurrent layers; null = model.dropout (AWD-LSTM's "
                                            "dropouth)", prob=True)
    dropout_output: float | None = _f(None, "dropout on the features fed to the softmax; null = model.dropout",
                                      prob=True)
    dropout_embedding: float = _f(0.0, "embedding dropout: in each training window, drop whole word types (every "
                                       "occurrence of a token at once) with this probability (Gal & Ghahramani "
                                       "2016; AWD-LSTM's dropoute)", prob=True)
    locked_dropout: bool = _f(False, "variational dropout: one mask per sequence, shared by all time steps of a "
                                     "window, at the input, hidden and output sites (Gal & Ghahramani 2016)")
    weight_drop: float = _f(0.0, "DropConnect on the recurrent (hidden-to-hidden) weights: in each training "
                                 "window, drop this fraction of their entries (Wan et al. 2013; AWD-LSTM's wdrop)",
                            prob=True)
    tie_weights: bool = _f(False, "share the embedding matrix with the output layer (a projection is added when "
                                  "hidden_size != embedding_size)")
    bidirectional: bool = _f(False, "two stacks (forward, and backward over reversed text), ELMo-style; "
                                    "no direction sees the token it predicts")
    head_layers: int = _f(0, "non-recurrent layers (linear + tanh) between the top recurrent layer and the softmax",
                          min=0, max=LAYERS_MAX)
    softmax: str = _f("full", "output layer", choices=("full", "adaptive"))
    adaptive_cutoffs: list[int] | None = _f(None, "cluster cutoffs of the adaptive softmax; null = chosen from the "
                                                  "vocabulary size")
    forget_bias: float | None = _f(None, "initial LSTM forget-gate bias (null = PyTorch's default init; 1.0, "
                                         "'remember by default', trained slower in short char-level runs)")
    init_range: float | None = _f(None, "uniform(-r, r) initialisation of all weights (Zaremba et al.); "
                                        "null = PyTorch defaults", gt=0)


@dataclass
class TrainConfig:
    batch_size: int = _f(32, "sequences trained in parallel (columns of the token stream)", min=1, max=COUNT_MAX)
    bptt: int = _f(128, "truncated backpropagation-through-time window, in tokens", min=1, max=COUNT_MAX)
    variable_bptt: bool = _f(False, "AWD-LSTM's variable window length: each training window N(bptt, 5) tokens long, or "
                                    "N(bptt/2, 5) one time in 20 (at least 5, at most bptt + 20), cut anew every "
                                    "epoch, with the step's lr scaled by length / bptt; off = windows of bptt")
    state_resets: bool | None = _f(None, "zero the carried state of one batch column per step, in turn (each column "
                                         "every batch_size steps), so the model also learns to start from the zero "
                                         "state, where sampling starts; null = on when data.eos resolves to none "
                                         "(text without <eos> markers) and batch_size >= 16, off otherwise (the "
                                         "value used is recorded in the run's config)")
    epochs: int = _f(3, "passes over the training split", min=1)
    max_steps: int | None = _f(1500, "stop after this many optimizer steps (null = no limit)", min=1)
    max_time: float | None = _f(None, "stop after this many seconds of training wall time (null = no limit); "
                                         "a cosine schedule then anneals to min_lr by that time", gt=0)
    optimizer: str = _f("adam", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.003, "learning rate", gt=0)
    momentum: float = _f(0.0, "SGD momentum, in [0, 1)", min=0, lt=1)
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)", min=0)
    beta2: float = _f(0.999, "adam/adamw second-moment decay β2 (0.99 suits short runs on small data)", min=0, lt=1)
    lr_schedule: str = _f("plateau", "plateau: divide by lr_decay when validation stops improving; "
                                     "step: multiply by lr_decay every epoch after lr_decay_start; "
                                     "cosine: linear warmup then cosine to min_lr at max_steps (or epochs, or max_time, "
                                     "whichever ends first); constant",
                          choices=("plateau", "step", "cosine", "constant"))
    lr_decay: float = _f(4.0, "plateau: divisor; step: multiplier per epoch", gt=0)
    lr_decay_start: int = _f(4, "step schedule: first epoch after which the lr decays", min=0)
    min_lr: float = _f(0.0, "floor of the learning rate: plateau and step decay stop there, cosine anneals to it "
                            "(below train.lr)", min=0)
    warmup_steps: int = _f(0, "linear warmup steps (cosine schedule)", min=0)
    averaging: str = _f("none", "weight averaging. nt: non-monotonically triggered averaging (NT-ASGD, Merity et "
                                "al. 2018): once a validation loss is worse than the best of those more than "
                                "averaging_patience evaluations back, keep the running mean of the weights after "
                                "every step from then on; validations use the mean, and best.pt holds it once one "
                                "beats the best so far (last.pt keeps the raw weights to train on). none: off",
                        choices=("none", "nt"))
    averaging_patience: int = _f(5, "NT-ASGD's non-monotone interval n, in evaluations (AWD-LSTM's nonmono)", min=1)
    ar: float = _f(0.0, "activation regularisation: add ar x mean(h^2) of the features fed to the softmax to the "
                        "training loss (Merity et al. 2017; AWD-LSTM's alpha, 2)", min=0)
    tar: float = _f(0.0, "temporal activation regularisation: add tar x mean((h<t+1> - h<t>)^2) of the top "
                         "recurrent layer's outputs before dropout (AWD-LSTM's beta, 1)", min=0)
    clip_grad_norm: float | None = _f(5.0, "clip gradients to this global L2 norm (null = off)", gt=0)
    early_stopping_patience: int | None = _f(None, "stop after this many evaluations without improvement", min=1)
    init_from: str | None = _f(None, "start from a trained model's weights (a run directory, meaning its best.pt, or "
                                     "a checkpoint file): its architecture, vocabulary and tokenizer are kept, the "
                                     "optimizer, schedule and data position start afresh; for fine-tuning on new "
                                     "text or a second training phase. null = random initial weights")
    seed: int = _f(1234, "random seed (weights, dropout)", min=SEED_MIN, max=SEED_MAX)
    device: str = _f("auto", "auto = cuda, then mps, then cpu; cuda:N = the N-th GPU", pattern=r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?",
                     pattern_help="auto, cpu, cuda, cuda:N or mps", suggest=("auto", "cpu", "cuda", "mps"))
    precision: str = _f("fp32", "fp32; bf16 autocast (CPU and GPU); fp16 autocast + GradScaler (CUDA); auto = bf16 "
                                "where the hardware computes it natively (a CUDA GPU with bf16, a CPU with "
                                "AVX-512 BF16 or AMX), else fp32",
                        choices=("fp32", "bf16", "fp16", "auto"))
    compile: bool = _f(False, "wrap the model and its loss in torch.compile (first steps slower while it compiles)")
    cuda_graphs: bool | None = _f(None, "on a CUDA GPU, record each training step (forward, loss, backward, "
                                         "clipping) as a CUDA graph and replay it: one launch instead of hundreds, "
                                         "for models too small to keep a GPU busy; null = on where it applies (one "
                                         "process, fp32 or bf16, full softmax below 2^25 logits per window, no "
                                         "torch.compile, fixed-length windows), which true also requires; false = never")
    tensorboard: bool = _f(False, "also write TensorBoard event files to RUN_DIR/tensorboard (needs the "
                                  "tensorboard package)")
    log_every: int = _f(50, "optimizer steps between train events", min=1)
    eval_every: int | None = _f(500, "optimizer steps between validations (also at each epoch end); null = epoch "
                                     "ends only; 0 = once, when training ends (for short timed runs)", min=0)
    save_every: int | None = _f(None, "also write last.pt every this many optimizer steps (null = at each "
                                      "evaluation only)", min=1)
    eval_batch_size: int = _f(16, "batch size of the validation passes during training (contiguous pieces in "
                                  "parallel, each start state checked against the exact carried one)", min=1,
                             max=COUNT_MAX)
    eval_max_tokens: int | None = _f(None, "evaluate on at most this many validation tokens during training "
                                           "(null = all)", min=1)
    out: str | None = _f(None, "run directory; null = runs/<config-name>-<timestamp>")


@dataclass
class SampleConfig:
    max_length: int = _f(500, "tokens per sample at most", min=0, max=COUNT_MAX)
    temperature: float = _f(0.8, "softmax temperature; 0 = greedy", min=0)
    top_k: int = _f(0, "keep only the k most probable tokens (0 = off)", min=0)
    top_p: float = _f(1.0, "nucleus sampling: keep the smallest set whose mass reaches p", prob=True, gt=0)
    num_samples: int = _f(1, "samples to draw", min=0, max=COUNT_MAX)
    prime: str = _f("", "text the samples continue")
    precision: str = _f("fp32", "fp32; bf16 = matrices of 2^20+ weights and 256+ columns (recurrent layers, output layer, "
                                "adaptive softmax) read in bfloat16, products accumulated in float32, states and draws in "
                                "float32: faster where memory is the limit (batch 1, big matrices); scores within bfloat16's "
                                "rounding of fp32's", choices=("fp32", "bf16"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    name: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def resolved_eos(self) -> str:
        return resolve_eos(self.data.eos, self.data.level)


def resolve_eos(eos: str, level: str) -> str:
    """data.eos as it applies: 'auto' is line for words, paragraph for chars."""
    if eos != "auto":
        return eos
    return "line" if level == "word" else "paragraph"


# model.* keys that act in training only (no weight depends on them): a resumed run may change them.
MODEL_TRAINING_KEYS = ("dropout", "dropout_input", "dropout_hidden", "dropout_output", "dropout_embedding",
                       "locked_dropout", "weight_drop")


# data.* keys that fix the vocabulary and what its ids mean: a run started from a trained model
# (train.init_from) keeps them.
VOCAB_KEYS = ("level", "lowercase", "eos", "tokenizer", "normalize", "min_freq", "max_vocab")


def model_architecture(m: ModelConfig) -> ModelConfig:
    """`m` with its training-only keys (MODEL_TRAINING_KEYS) at their defaults: what the weights depend on."""
    defaults = ModelConfig()
    return dataclasses.replace(m, **{k: getattr(defaults, k) for k in MODEL_TRAINING_KEYS})


SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


# Names other tools use for our keys: suggested when a key is unknown (not accepted silently).
_OTHER_NAMES = {
    "learning_rate": "train.lr", "nhid": "model.hidden_size", "hidden": "model.hidden_size",
    "emsize": "model.embedding_size", "embed_size": "model.embedding_size", "embedding_dim": "model.embedding_size",
    "nlayers": "model.num_layers", "layers": "model.num_layers", "rnn_type": "model.cell", "model": "model.cell",
    "tied": "model.tie_weights", "tie": "model.tie_weights", "clip": "train.clip_grad_norm",
    "grad_clip": "train.clip_grad_norm", "seq_len": "train.bptt", "block_size": "train.bptt",
    "steps": "train.max_steps", "max_iters": "train.max_steps", "batch": "train.batch_size",
    "patience": "train.early_stopping_patience", "data": "data.path", "dataset": "data.path",
    "vocab_size": "data.max_vocab", "dropouti": "model.dropout_input", "dropouth": "model.dropout_hidden",
    "dropoute": "model.dropout_embedding", "wdrop": "model.weight_drop",
    "nonmono": "train.averaging_patience", "asgd": "train.averaging",
    "temp": "sample.temperature", "length": "sample.max_length",
}


def _closest(word: str, options: list[str]) -> str:
    name = word.rsplit(".", 1)[-1].lower()
    if name in _OTHER_NAMES and _OTHER_NAMES[name] in options:
        return f" (did you mean '{_OTHER_NAMES[name]}'?)"
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.4)
    return f" (did you mean '{match[0]}'?)" if match else ""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 2


def _show(value: Any) -> str:
    """A short repr for error messages: bounded even for huge or self-referencing YAML values."""
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _check_value(key: str, value: Any, hint: Any, meta: dict[str, Any]) -> Any:
    """Coerce `value` to the annotated type `hint` and check the field's rules; return the value."""
    optional = _is_union(hint) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None and "choices" in meta and None in meta["choices"]:
        return None

    def bad(expected: str) -> UsageError:
        return UsageError(f"config key '{key}' must be {expected}{' (or null)' if optional else ''}, "
                          f"got {_show(value)}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value.strip())
            except ValueError:
                raise bad("a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        try:
            value = float(value)
        except OverflowError:
            raise bad("a finite number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
    elif hint is str:
        if not isinstance(value, str):
            if "choices" in meta:
                raise bad("one of " + ", ".join(str(c) for c in meta["choices"] if c is not None))
            raise bad(meta.get("pattern_help", "a string"))
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        value = [_check_value(f"{key}[{i}]", v, args[0], {k: meta[k] for k in ("min", "gt") if k in meta})
                 for i, v in enumerate(value)]
    if "choices" in meta and not isinstance(value, list) and value not in meta["choices"]:
        raise UsageError(f"config key '{key}' must be one of "
                         + ", ".join(str(c) for c in meta["choices"] if c is not None)
                         + f"; got {_show(value)}" + _closest(str(value), [str(c) for c in meta["choices"] if c]))
    if "pattern" in meta and isinstance(value, str) and not re.fullmatch(meta["pattern"], value):
        raise UsageError(f"config key '{key}' must be {meta['pattern_help']}, got {_show(value)}"
                         + _closest(value, list(meta.get("suggest", ()))))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise UsageError(f"config key '{key}' must be >= {meta['min']}, got {_show(value)}")
        if "gt" in meta and value <= meta["gt"]:
            raise UsageError(f"config key '{key}' must be > {meta['gt']}, got {_show(value)}")
        if "lt" in meta and value >= meta["lt"]:
            raise UsageError(f"config key '{key}' must be < {meta['lt']}, got {_show(value)}")
        if "max" in meta and value > meta["max"]:
            raise UsageError(f"config key '{key}' must be <= {meta['max']}, got {_show(value)}")
        if meta.get("prob") and not 0.0 <= value <= 1.0:
            raise UsageError(f"config key '{key}' is a probability and must lie in [0, 1], got {_show(value)}")
    return value


def _lookup(key: str) -> tuple[str, dataclasses.Field]:
    """The (section, field) a dotted key names; an unknown key -> UsageError naming the closest one."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SECTION_CLASSES:
        example = next(k for k in all_keys() if k.startswith(key + "."))
        raise UsageError(f"'{key}' is a config section, not a key; set one of its keys, e.g. {example}=VALUE")
    if len(parts) == 2 and parts[0] in SECTION_CLASSES:
        fields = {f.name: f for f in dataclasses.fields(SECTION_CLASSES[parts[0]])}
        if parts[1] in fields:
            return parts[0], fields[parts[1]]
        raise UsageError(f"unknown config key '{key}'" + _closest(key, all_keys()))
    if parts[0] not in SECTION_CLASSES:
        raise UsageError(f"unknown config section or key '{key}' (sections: {', '.join(SECTIONS)})"
                         + _closest(key, all_keys() + list(SECTIONS)))
    raise UsageError(f"unknown config key '{key}'" + _closest(key, all_keys()))


def _hint(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTION_CLASSES[section])[name]


def _set(cfg: Config, key: str, value: Any) -> None:
    section, f = _lookup(key)
    value = _check_value(key, value, _hint(section, f.name), dict(f.metadata))
    setattr(getattr(cfg, section), f.name, value)


def _validate_whole(cfg: Config) -> None:
    """Checks that involve more than one key."""
    split = cfg.data.split
    if len(split) != 3 or any(not 0.0 <= s <= 1.0 for s in split) or abs(sum(split) - 1.0) > 1e-6:
        raise UsageError(f"config key 'data.split' must be three fractions in [0, 1] summing to 1, got {split}")
    if split[0] <= 0:
        raise UsageError("config key 'data.split' must give the training split a fraction > 0")
    if cfg.model.softmax == "adaptive" and cfg.model.tie_weights:
        raise UsageError("model.tie_weights cannot be combined with model.softmax=adaptive; set one of them off")
    if cfg.model.adaptive_cutoffs is not None:
        c = cfg.model.adaptive_cutoffs
        if not c or any(a >= b for a, b in zip(c, c[1:])) or c[0] < 1:
            raise UsageError(f"config key 'model.adaptive_cutoffs' must be a strictly increasing list of positive "
                             f"integers, got {_show(c)}")
    if cfg.train.min_lr >= cfg.train.lr:
        raise UsageError(f"train.min_lr={cfg.train.min_lr:g} must be below train.lr={cfg.train.lr:g} (it is the "
                         f"floor the schedule decays to)")
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        raise UsageError("train.precision=fp16 needs a CUDA device; on CPU use train.precision=bf16")


def _set_name(cfg: Config, value: Any, origin: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise UsageError(f"{origin}: 'name' must be a non-empty string, got {_show(value)}")
    cfg.name = str(value).strip()


def apply_dict(cfg: Config, data: Any, origin: str) -> None:
    """Apply a nested mapping ({section: {key: value}}) onto cfg."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), "
                         f"got {_show(data)}")
    for section, values in data.items():
        if section == "name":
            _set_name(cfg, values, origin)
            continue
        if section not in SECTION_CLASSES:
            raise UsageError(f"{origin}: unknown config section '{_show(section).strip(chr(39))}' "
                             f"(sections: {', '.join(SECTIONS)})" + _closest(str(section), list(SECTIONS)))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UsageError(f"{origin}: section '{section}' must be a mapping of keys to values, "
                             f"got {_show(values)}")
        for name, value in values.items():
            try:
                _set(cfg, f"{section}.{name}", value)
            except UsageError as e:
                raise UsageError(f"{origin}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML would keep the last
    one silently: a config with two `model:` sections would lose the first)."""

    def _check_unique(self, node) -> None:
        seen = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: explicit keys may override it,
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:                        # but the merged mapping itself is checked
                    if isinstance(src, yaml.MappingNode):
                        self._check_unique(src)
                continue
            key = self.construct_object(key_node)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                return
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (it appears twice in one mapping)", key_node.start_mark)
            seen.add(key)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._check_unique(node)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"config path {p} is a directory; give a YAML file")
    if not p.exists():  # a pipe (`--config <(...)`) or /dev/null reads like a file
        raise UsageError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UsageError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {p} is not UTF-8 text (invalid byte at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        if re.search(r":\s+[*&]", line):  # `glob: **/*.py`: YAML reads a leading * as an alias
            problem += "; a value starting with * or & needs quotes in YAML, e.g. glob: '**/*.py'"
        raise UsageError(f"{kind} in {p}{where}: {problem}") from None
    except RecursionError:
        raise UsageError(f"config file {p} is nested too deeply to be a config") from None
    except Exception as e:  # e.g. `!!timestamp 2020-13-45`: valid YAML syntax, an impossible value
        raise UsageError(f"cannot read config file {p}: {type(e).__name__}: {e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """'model.hidden_size=650' -> ('model.hidden_size', 650). The value is read as a YAML scalar."""
    key, value, _ = _parse_override(item)
    return key, value


def _parse_override(item: str) -> tuple[str, Any, str]:
    if not isinstance(item, str) or "=" not in item:
        raise UsageError(f"override {_show(item)} must look like KEY=VALUE, e.g. model.hidden_size=650")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UsageError(f"override {_show(item)} has no key; write KEY=VALUE, e.g. model.hidden_size=650")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception:  # not a YAML scalar (bad syntax, an impossible date, ...): take it as plain text
        value = raw
    if raw.strip().startswith(("&", "*")):  # YAML's anchors and aliases (`&x` would read as null): the text
        value = raw.strip()
    return key, value, raw


def _apply_override(cfg: Config, item: str) -> None:
    key, value, raw = _parse_override(item)
    if key == "name":  # the one top-level key (the run's name: runs/<name>-<time>); text as written
        _set_name(cfg, raw.strip() if value is not None else value, f"override {_show(item)}")
        return
    section, f = _lookup(key)
    hint = _hint(section, f.name)
    plain_str = hint is str or (_is_union(hint) and str in typing.get_args(hint) and len(typing.get_args(hint)) == 2)
    if plain_str and "choices" not in f.metadata and "pattern" not in f.metadata and value is not None and not isinstance(value, (str, list, dict)):
        # A path or a name that YAML reads as a number, boolean or date (`train.out=2024`): keep the text.
        value = raw.strip()
    _set(cfg, key, value)
    # Remember what the command line said, even where it equals the default: a resumed run applies
    # these train.*/sample.* values over its saved ones (`train.max_time=null` must lift a budget).
    cfg.__dict__.setdefault("overridden", set()).add(f"{section}.{f.name}")


def build_config(config_path: str | Path | None = None, overrides: list[str] | None = None,
                 base: dict[str, Any] | None = None) -> Config:
    """Defaults, then `base` (e.g. a checkpoint's config), then the YAML file, then KEY=VALUE overrides."""
    cfg = Config()
    if base is not None:
        apply_dict(cfg, base, "saved config")
    if config_path is not None:
        cfg.name = Path(config_path).stem  # unless the file names itself
        data = load_yaml(config_path)
        apply_dict(cfg, data, str(config_path))
        # the keys the file states (also at their default values): a run that continues another
        # (--resume, train.init_from) checks them against the model it continues
        if isinstance(data, dict):
            cfg.__dict__.setdefault("stated", set()).update(
                f"{sec}.{k}" for sec, vals in data.items() if sec in SECTION_CLASSES and isinstance(vals, dict)
                for k in vals)
    for item in overrides or []:
        _apply_override(cfg, item)
    _validate_whole(cfg)
    return cfg


def checked(cfg: Config) -> Config:
    """A Config assembled in code, put through the checks `build_config` applies: a normalised copy,
    or a UsageError naming the key (a bad value must not train, or leave a run that cannot load)."""
    out = Config()
    for s in SECTIONS:
        section = getattr(cfg, s)
        for f in dataclasses.fields(SECTION_CLASSES[s]):
            _set(out, f"{s}.{f.name}", getattr(section, f.name))
    _set_name(out, cfg.name, "config")
    _validate_whole(out)
    for attr in ("overridden", "stated"):
        if hasattr(cfg, attr):
            out.__dict__[attr] = set(getattr(cfg, attr))
    return out


def stated_keys(cfg: Config) -> set[str]:
    """The dotted keys a config file or KEY=VALUE items set, also those set to their default value."""
    return set(getattr(cfg, "stated", ())) | set(getattr(cfg, "overridden", ()))


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    apply_dict(cfg, data, "saved config")
    _validate_whole(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump({"name": cfg.name, **cfg.to_dict()}, sort_keys=False, allow_unicode=True)


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key (the README's table lists the same; `rnnlm train
    --print-config` shows the help as comments)."""
    rows = []
    for s, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{s}.{f.name}", yaml.safe_dump(default, default_flow_style=True).strip().removesuffix(
                "\n...").removesuffix("..."), f.metadata.get("help", "")))
    return rows


def _yaml_scalar(value: Any) -> str:
    """One value as inline YAML (flow style, never wrapped)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=float("inf")).strip()
    text = text.removesuffix("...").strip()
    if isinstance(value, str) and (len(text.splitlines()) != 1 or not value.isprintable()):
        # line breaks of any kind (\n, NEL, U+2028...) or control characters: one double-quoted line
        text = yaml.safe_dump(value, default_style='"', allow_unicode=True, width=float("inf"))
        text = text.strip().removesuffix("...").strip()
    return text


def commented_yaml(cfg: Config) -> str:
    """The whole config as YAML, each key followed by its help as a comment; it loads back
    (``--config``) to the same config."""
    helps = {key: text for key, _, text in describe_keys()}
    lines = [f"name: {_yaml_scalar(cfg.name)}"]
    for s in SECTIONS:
        rows = [(f.name, _yaml_scalar(getattr(getattr(cfg, s), f.name)), helps.get(f"{s}.{f.name}", ""))
                for f in dataclasses.fields(SECTION_CLASSES[s])]
        width = max(len(n) + len(v) for n, v, _ in rows) + 6
        lines.append(f"{s}:")
        for name, value, text in rows:
            item = f"  {name}: {value}"
            lines.append(f"{item:<{width}}# {text}" if text else item)
    return "\n".join(lines) + "\n"
