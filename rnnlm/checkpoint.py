"""Checkpoints: atomic writes and safe loads.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python data
(dicts, lists, strings, numbers): the model weights, the resolved config, the vocabulary
and tokenizer settings, and in ``last.pt`` also the trainer state (optimizer, scheduler,
RNG states, data position, carried hidden state). It is loaded with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects, so a
checkpoint from a stranger cannot run code.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, and then
renamed over the old file (atomic on POSIX): a crash at any moment leaves the previous
checkpoint intact and loadable.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RunError, UsageError

FORMAT = "rnnlm-checkpoint"
FORMAT_VERSION = 1
BEST, LAST = "best.pt", "last.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old or the new file, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Serialise `payload` (tensors and plain data only) and write it atomically."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as e:
        raise RunError(f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint is intact "
                       f"(free disk space or choose another --out)") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint (or last, if there is no best yet)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (BEST, LAST):
            if (p / name).is_file():
                return p / name
        raise UsageError(f"run directory {p} holds no checkpoint ({BEST} or {LAST}); did training write one?")
    if not p.exists():
        raise UsageError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (no arbitrary unpickling); any problem -> UsageError."""
    p = resolve_checkpoint(path)
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise UsageError(f"refusing to load {p}: it is not a plain rnnlm checkpoint ({first[:200]}). "
                         f"Checkpoints are loaded with weights_only=True, so files that would run code "
                         f"are rejected") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read checkpoint {p}: truncated or not a checkpoint file ({msg[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{p} is not an rnnlm checkpoint")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(f"{p} has checkpoint format version {version}, newer than this rnnlm reads "
                         f"({FORMAT_VERSION}); upgrade rnnlm")
    for key in ("model", "config", "vocab"):
        if key not in data:
            raise UsageError(f"{p} is not a complete rnnlm checkpoint (missing '{key}')")
    data["path"] = str(p)
    return data


@dataclass
class LoadedModel:
    model: Any
    config: Any
    vocab: Any
    tokenizer: Any
    checkpoint: dict[str, Any]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model, config, vocabulary and tokenizer stored in a checkpoint."""
    from .config import config_from_dict
    from .models import RNNLM
    from .text import Tokenizer, Vocab

    ck = load_checkpoint(path)
    try:
        cfg = config_from_dict(ck["config"])
    except UsageError as e:
        raise UsageError(f"{ck['path']}: its stored config is invalid: {e}") from None
    vocab = Vocab.from_dict(ck["vocab"])
    tok_settings = ck["vocab"].get("tokenizer")
    tokenizer = Tokenizer(**tok_settings) if tok_settings else Tokenizer.from_config(cfg.data, cfg.resolved_eos())
    model = RNNLM(len(vocab), cfg.model)
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"{ck['path']}: weights do not match its config/vocabulary ({len(vocab)} tokens): "
                         f"{' '.join(first[:2])[:300]}") from None
    model.to(device).eval()
    return LoadedModel(model, cfg, vocab, tokenizer, ck)
