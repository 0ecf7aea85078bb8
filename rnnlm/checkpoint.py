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

import glob
import io
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RunError, UsageError

FORMAT = "rnnlm-checkpoint"
FORMAT_VERSION = 1
BEST, LAST = "best.pt", "last.pt"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of `path` left behind by writers that died mid-write (e.g. SIGKILL).

    A temp name carries its writer's pid; files of live processes are left alone.
    """
    try:
        candidates = list(path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        try:
            pid = int(tmp.name[len(_temp_prefix(path)):].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and pid_alive(pid):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (the holder of a lock or a temp file).

    POSIX: signal 0, which checks without sending anything. Not on Windows: there ``os.kill(pid, 0)``
    sends CTRL_C_EVENT (0) to a console process group, or kills the process outright; the process
    is asked for its exit code instead (:func:`_pid_alive_windows`)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p          # a HANDLE is pointer-sized, not an int
        kernel32.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
        kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
        kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
        return _pid_alive_windows(pid, kernel32, ctypes)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_STILL_ACTIVE = 259            # GetExitCodeProcess's code for a process that has not exited
_ERROR_ACCESS_DENIED = 5


def _pid_alive_windows(pid: int, kernel32, ctypes) -> bool:
    """`pid_alive` through the Win32 API: OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION), then
    GetExitCodeProcess. A process that exists but may not be opened counts as alive."""
    handle = kernel32.OpenProcess(0x1000, False, pid)
    if not handle:
        return ctypes.get_last_error() == _ERROR_ACCESS_DENIED
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True                         # cannot tell: do not take its lock or files away
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _default_mode() -> int:
    """0o666 less the process umask: the mode `open()` would give a new file."""
    try:  # Linux: read it without changing it (os.umask is process-wide, not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old or the new file, never a torn one.

    The bytes go to a temp file in the same directory (named after this process's pid), which is
    flushed, fsync'ed and renamed over `path`. On any failure the temp file is removed and the
    old `path`, if any, is untouched. Raises OSError (e.g. ENOSPC) to the caller.
    """
    path = Path(path)
    try:  # keep the permissions of the file being replaced (mkstemp would make it 0600)
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, mode)
        except OSError:  # a file system without permissions: keep what mkstemp gave
            pass
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
    _remove_stale_temps(path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Serialise `payload` (tensors and plain data only) and write it atomically."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    existed = Path(path).exists()
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as e:
        before = "the previous checkpoint is intact" if existed else "nothing was written in its place"
        raise RunError(f"could not write checkpoint {path}: {e.strerror or e}; {before} "
                       f"(free disk space or choose another --out)") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint (or last, if there is no best yet). ``runs/latest``
    is a link the trainer keeps to its newest default run directory; where no link could be made
    (Windows without the right to make symbolic links) it means the run directory beside it whose
    checkpoint was written last."""
    p = Path(path).expanduser()
    if p.name == "latest" and not p.exists() and not p.is_symlink() and p.parent.is_dir():
        p = _newest_run(p.parent) or p
    if p.is_dir():
        for name in (BEST, LAST):
            if (p / name).is_file():
                return p / name
        raise UsageError(f"run directory {p} holds no checkpoint ({BEST} or {LAST}); did training write one?")
    if not p.exists():
        raise UsageError(f"checkpoint not found: {p}")
    return p


def _newest_run(runs: Path) -> Path | None:
    """The directory in `runs` whose best.pt or last.pt was written last, if any."""
    newest, when = None, -1.0
    try:
        for d in runs.iterdir():
            for name in (BEST, LAST):
                try:
                    t = (d / name).stat().st_mtime if (d / name).is_file() else -1.0
                except OSError:
                    continue
                if t > when:
                    newest, when = d, t
    except OSError:
        return None
    return newest


_ZIP_MAGIC = b"PK\x03\x04"


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of a library's error text (its advice after that is not for rnnlm's users)."""
    text = text.strip()
    for prefix in ("WeightsUnpickler error:",):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
    head = text.split(". ")[0].rstrip(".")
    return head if len(head) <= limit else head[:limit - 3].rstrip() + "..."


def _refusal(err: BaseException) -> tuple[str, bool]:
    """(what the weights-only unpickler refused, whether it was a Python object that could run code)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith(("Trying to call reduce", "Can only build", "Unsupported class")):
            return _first_sentence(ln), True
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln and i + 1 < len(lines):
            return _first_sentence(lines[i + 1]), False
    return _first_sentence(lines[0] if lines else type(err).__name__), False


def _instead(p: Path) -> str:
    """What to use when checkpoint `p` cannot be read."""
    if p.name == LAST:
        return (f"Sampling and evaluation can use the run's {BEST}; resuming needs {LAST}'s trainer state, "
                f"so training must start again (in a new --out)")
    if p.name == BEST:
        return f"Use the run's {LAST} (--checkpoint {p.with_name(LAST)}) or train again"
    return "Use another checkpoint or train again"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (no arbitrary unpickling); any problem -> UsageError.

    Only the zip format that ``torch.save`` writes is accepted, and it is read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, no Python objects.
    """
    p = resolve_checkpoint(path)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
    if not head:
        raise UsageError(f"checkpoint {p} is empty (0 bytes); it was not written completely. {_instead(p)}")
    if head != _ZIP_MAGIC:
        raise UsageError(f"{p} is not an rnnlm checkpoint (not a file written by torch.save; an rnnlm "
                         f"checkpoint is a zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason, unsafe = _refusal(e)
        if unsafe:
            raise UsageError(f"refusing to load {p}: it holds Python objects that could run code when loaded "
                             f"({reason}). rnnlm checkpoints hold only tensors and plain data; do not use "
                             f"this file") from None
        raise UsageError(f"cannot read checkpoint {p}: it is corrupt or not an rnnlm checkpoint "
                         f"({reason})") from None
    except MemoryError:
        raise UsageError(f"cannot read checkpoint {p}: it is corrupt (it asks for more memory than "
                         f"there is)") from None
    except Exception as e:  # zip/stream errors of a truncated or damaged file, and anything else odd
        msg = _first_sentence(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read checkpoint {p}: it is truncated or corrupt ({msg}). {_instead(p)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{p} is not an rnnlm checkpoint (a torch file without rnnlm's format marker)")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise UsageError(f"{p} has no valid checkpoint format version ({_short(version)})")
    if version > FORMAT_VERSION:
        raise UsageError(f"{p} has checkpoint format version {version}, newer than this rnnlm reads "
                         f"({FORMAT_VERSION}); upgrade rnnlm (pip install -U rnnlm)")
    for key, kind in (("model", dict), ("config", dict), ("vocab", dict)):
        if not isinstance(data.get(key), kind):
            raise UsageError(f"{p} is not a complete rnnlm checkpoint ('{key}' is missing or malformed)")
    data["path"] = str(p)
    return data


def _short(value: Any) -> str:
    r = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return r[:60]


@dataclass
class LoadedModel:
    model: Any
    config: Any
    vocab: Any
    tokenizer: Any
    checkpoint: dict[str, Any]


def stored_config(ck: dict[str, Any]):
    """The Config a loaded checkpoint holds; a UsageError naming the file when it is invalid."""
    from .config import config_from_dict
    try:
        return config_from_dict(ck["config"])
    except UsageError as e:
        raise UsageError(f"{ck['path']}: its stored config is invalid: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model, config, vocabulary and tokenizer stored in a checkpoint."""
    from .models import RNNLM
    from .text import Tokenizer, Vocab

    if isinstance(device, str):
        from .train import select_device
        device = select_device(device, "device")  # "gpu", or cuda on a machine without: a UsageError
    ck = load_checkpoint(path)
    where = ck["path"]
    cfg = stored_config(ck)
    try:
        vocab = Vocab.from_dict(ck["vocab"])
        tok_settings = ck["vocab"].get("tokenizer")
        tokenizer = Tokenizer(**tok_settings) if tok_settings else Tokenizer.from_config(cfg.data, cfg.resolved_eos())
    except UsageError as e:
        raise UsageError(f"{where}: its stored vocabulary is invalid: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise UsageError(f"{where}: its stored vocabulary is malformed ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        model = RNNLM(len(vocab), cfg.model)
    except UsageError as e:
        raise UsageError(f"{where}: cannot build the model its config describes: {e}") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"{where}: cannot build the model its config describes ({str(e)[:200]})") from None
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"{where}: the weights do not match its config and vocabulary ({len(vocab)} tokens): "
                         f"{' '.join(first[:2])[:300]}") from None
    model.to(device).eval()
    return LoadedModel(model, cfg, vocab, tokenizer, ck)
