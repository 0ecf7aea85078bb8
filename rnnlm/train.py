"""The Trainer: truncated BPTT with clipping, schedules, evaluation, checkpoints, resume.

Read it top to bottom: `Trainer.__init__` builds everything from the config (or restores it
from ``last.pt``), `Trainer.fit` runs the loop. One optimizer step per BPTT window; the
hidden state is carried from window to window and detached at each boundary (truncated
backpropagation through time); gradients are clipped by their global L2 norm.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from rich.markup import escape

from . import __version__
from . import distributed as D
from .allocator import tune_allocator
from .checkpoint import (BEST, LAST, atomic_write_text, load_checkpoint, pid_alive, resolve_checkpoint,
                         save_checkpoint, stored_config)
from .config import (MODEL_TRAINING_KEYS, STATE_RESETS_MIN_BATCH, VOCAB_KEYS, Config, ModelConfig, checked,
                     config_from_dict, dump_yaml, load_yaml, model_architecture, resolve_eos, stated_keys)
from .cudagraph import GraphedStep, graph_blocker
from .data import Corpus, batchify, get_window, load_corpus, window, window_bounds, with_start
from .errors import RunError, UsageError
from .evaluate import _exp, evaluate_ids
from .models import RNNLM, _plain_loss, detach_state, reset_column, state_from_list, state_to_list
from .ops import autocast_available
from .text import Tokenizer, Vocab


# -- building blocks -------------------------------------------------------------------------

def select_device(name: str, source: str = "train.device") -> torch.device:
    """The torch device for `name` (auto, cpu, cuda, cuda:N, mps); a name it does not know, or a
    device this machine lacks, is a UsageError naming `source`, the setting it came from (a config
    key, or a command-line option such as ``--device``)."""
    key = "." in source                      # train.device=cuda, or --device cuda
    asked = f"{source}={name}" if key else f"{source} {name}"
    instead = f"use {source}=auto or cpu" if key else f"use {source} auto or cpu"
    if not re.fullmatch(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?", name):
        raise UsageError(f"{source} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"{asked} but no CUDA device is available; {instead}")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"{asked} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{asked} but MPS is not available; {instead}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": _py_rng_to_plain(random.getstate()),
          "numpy": _np_rng_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_py_rng_from_plain(st["python"]))
    np.random.set_state(_np_rng_from_plain(st["numpy"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# RNG states are stored as plain lists/tensors so `torch.load(weights_only=True)` accepts them.
def _py_rng_to_plain(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_plain(s):
    return (s[0], tuple(s[1]), s[2])


def _np_rng_to_plain(s):
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4])]


def _np_rng_from_plain(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    cls = torch.optim.Adam if tc.optimizer == "adam" else torch.optim.AdamW
    kw = dict(lr=tc.lr, betas=(0.9, tc.beta2), weight_decay=tc.weight_decay)
    # The fused kernel updates every tensor in one pass: ~10x faster than the per-tensor loop on CPU
    # (3.0 -> 0.3 ms a step for a 1.3M-parameter char LSTM), a tenth of that model's step time.
    if {p.device.type for p in params} in ({"cpu"}, {"cuda"}) and all(p.is_floating_point() for p in params):
        try:
            return cls(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported dtype
            pass
    return cls(params, **kw)


class LRSchedule:
    """Learning-rate policy; its whole state is a small dict saved in ``last.pt``.

    * plateau  -- lr /= lr_decay whenever a validation loss is not better than the best so far
                  (the PyTorch word-language-model example's /4), down to ``min_lr``;
    * step     -- lr *= lr_decay at the end of every epoch after ``lr_decay_start``
                  (Zaremba et al. 2014: x0.5 after epoch 4), down to ``min_lr``;
    * cosine   -- linear warmup for ``warmup_steps``, then cosine from lr to ``min_lr`` (default 0) over
                  ``total_steps``;
                  with ``train.max_time`` the horizon is also capped by the step count projected to fit
                  in that time (:meth:`set_horizon`, re-estimated at each log step), so a run told
                  "80 seconds" anneals to 0 as its time runs out;
    * constant -- unchanged.
    """

    def __init__(self, tc, total_steps: int | None):
        self.kind = tc.lr_schedule
        self.base_lr = tc.lr
        self.decay = tc.lr_decay
        self.decay_start = tc.lr_decay_start
        self.warmup = tc.warmup_steps
        self.total = total_steps
        self.horizon: int | None = None  # steps projected to fit in train.max_time (None: not time-bound)
        self.lr = tc.lr
        self.min_lr = tc.min_lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.lr = float(d["lr"])
        h = d.get("horizon")
        self.horizon = None if h is None else int(h)

    def set_horizon(self, steps: int | None) -> None:
        """Cap the cosine's length at `steps` (the trainer's projection of what fits in max_time)."""
        self.horizon = steps

    def total_steps(self) -> int | None:
        if self.horizon is None:
            return self.total
        return self.horizon if self.total is None else min(self.total, self.horizon)

    def on_step(self, step: int) -> float:
        if self.kind == "cosine":
            if self.warmup and step < self.warmup:
                self.lr = self.base_lr * (step + 1) / self.warmup
            elif total := self.total_steps():
                frac = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
                self.lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * frac))
        return self.lr

    def on_eval(self, improved: bool) -> float:
        if self.kind == "plateau" and not improved:
            self.lr = max(self.lr / self.decay, self.min_lr)
        return self.lr

    def on_epoch_end(self, epochs_done: int) -> float:
        if self.kind == "step" and epochs_done >= self.decay_start:
            self.lr = max(self.lr * self.decay, self.min_lr)
        return self.lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU has bfloat16 instructions (AVX-512 BF16 or AMX), from /proc/cpuinfo.

    Without them PyTorch emulates bf16 on CPU and autocast makes training slower, not faster.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` with ``auto`` replaced by what this device runs fastest: bf16 or fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def plain_sgd(opt: torch.optim.Optimizer) -> bool:
    """True for SGD whose update is exactly p -= lr * g (no momentum, weight decay, maximize)."""
    return type(opt) is torch.optim.SGD and all(
        g["momentum"] == 0 and g["weight_decay"] == 0 and not g.get("maximize", False) for g in opt.param_groups)


@torch.no_grad()
def clipped_sgd_step(params: list[torch.Tensor], lr: float, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_(params, max_norm)`` followed by plain SGD, in one pass over the weights.

    The same arithmetic -- total 2-norm of all gradients, coef = min(1, max_norm / (norm + 1e-6)),
    p -= lr * coef * g -- without writing the clipped gradients back first. Sparse gradients
    (``nn.Embedding(sparse=True)``: only the rows of the window's tokens) are coalesced and
    applied to those rows alone. The gradients are left unclipped. CPU only: the coefficient is
    read on the host. Returns the total norm (before clipping), like clip_grad_norm_.
    """
    dense, dense_g, sparse = [], [], []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            sparse.append((p, p.grad.coalesce()))
        else:
            dense.append(p)
            dense_g.append(p.grad)
    norms = list(torch._foreach_norm(dense_g)) if dense_g else []
    norms += [torch.linalg.vector_norm(g.values()) for _, g in sparse]
    total = torch.linalg.vector_norm(torch.stack(norms).float()) if norms else torch.zeros(())
    c = max_norm / (float(total) + 1e-6)
    coef = 1.0 if c >= 1.0 else c          # NaN stays NaN, as in clip_grad_norm_'s clamp
    if dense:
        torch._foreach_add_(dense, dense_g, alpha=-lr * coef)
    for p, g in sparse:
        p.index_add_(0, g.indices()[0], g.values().to(p.dtype), alpha=-lr * coef)
    return total


class RunLock:
    """One trainer per run directory: a lock file with the holder's pid; a dead holder's lock is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def holder(self) -> int | None:
        """The pid of a live process holding the lock, if any."""
        try:
            pid = int(self.path.read_text().strip() or "0")
        except (OSError, ValueError):
            return None
        return pid if pid and pid != os.getpid() and pid_alive(pid) else None

    def check(self) -> None:
        pid = self.holder()
        if pid is not None:
            raise UsageError(f"run directory {self.path.parent} is in use by another rnnlm process (pid {pid}); "
                             f"wait for it or choose another --out")

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise UsageError(f"run directory {self.path.parent} is in use by another rnnlm process "
                                     f"(pid {pid}); wait for it or choose another --out") from None
                try:
                    self.path.unlink()  # stale lock of a dead process
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:  # a read-only or permission-protected run directory
                if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
                    raise
                raise UsageError(f"cannot write in the run directory {self.path.parent}: {e.strerror or e}; "
                                 f"choose another --out (or copy the run to a writable place to resume it)") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise UsageError(f"could not lock run directory {self.path.parent}")

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (flushed, so a crash loses nothing logged),
    and mirrors the numbers to TensorBoard when asked to."""

    def __init__(self, path: Path | None, tensorboard: bool = False, warn=None):
        self.path = path
        self._f = None
        if path is not None:
            # A crash can leave a torn last line: start on a fresh line so events never merge.
            torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
            self._f = open(path, "a", encoding="utf-8")
            if torn:
                self._f.write("\n")
        self._tb = None
        if tensorboard and path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(path.parent / "tensorboard"))
            except ImportError:
                if warn is not None:
                    warn("[yellow]warning:[/] train.tensorboard=true but the tensorboard package is not installed "
                         "(pip install tensorboard); metrics.jsonl is still written")

    def write(self, event: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(event, allow_nan=True) + "\n")
            self._f.flush()
        if self._tb is not None and event["event"] in ("train", "eval"):
            prefix = "train" if event["event"] == "train" else event.get("split", "eval")
            for k, v in event.items():
                if (k not in ("event", "step", "tokens", "time", "split", "epoch") and isinstance(v, (int, float))
                        and not isinstance(v, bool)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, event["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# -- the trainer ------------------------------------------------------------------------------

class Trainer:
    """Trains an RNNLM as the config says, writing a run directory.

    >>> trainer = Trainer(cfg, run_dir="runs/demo")   # doctest: +SKIP
    >>> summary = trainer.fit()                       # doctest: +SKIP
    """

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False,
                 console=None, progress: bool | None = None, corpus: Corpus | None = None):
        self.console = console
        self.resume = resume
        cfg = checked(cfg)  # a Config built in code gets the checks a YAML file or KEY=VALUE gets
        if resume and run_dir is None and cfg.train.out is None:
            raise UsageError("--resume needs --out RUN_DIR (the run directory to continue)")
        # Under torchrun, start the process group first so that every rank agrees on the run directory.
        self.dist = D.from_env()
        if self.dist.enabled:
            if cfg.train.batch_size % self.dist.world_size:
                raise UsageError(f"train.batch_size={cfg.train.batch_size} must be divisible by the number of "
                                 f"processes ({self.dist.world_size}): each rank trains on an equal share")
            D.init(self.dist, select_device(cfg.train.device).type)
        if cfg.train.out is not None and not cfg.train.out.strip():
            raise UsageError("train.out is empty; give a run directory, or leave it unset (null) for "
                             "runs/<config>-<time>")
        self.default_run_dir = run_dir is None and cfg.train.out is None
        if run_dir is None:
            run_dir = cfg.train.out or f"runs/{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(D.broadcast_object(str(run_dir), self.dist))
        ckpt = None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"--out {self.run_dir} exists and is not a directory; choose another --out")
        above = next((p for p in self.run_dir.parents if p.exists()), None)
        if not self.run_dir.exists() and above is not None and not above.is_dir():
            raise UsageError(f"--out {self.run_dir} cannot be created: {above} is a file, not a directory; "
                             f"choose another --out")
        if self.run_dir.is_dir():
            RunLock(self.run_dir).check()  # another live trainer here: say so before anything else
        if resume:
            if not (self.run_dir / LAST).is_file():
                raise UsageError(f"nothing to resume in {self.run_dir}: no {LAST} (start without --resume)")
            ckpt = load_checkpoint(self.run_dir / LAST)
            if not isinstance(ckpt.get("trainer"), dict):
                raise UsageError(f"{self.run_dir / LAST} holds weights only, no trainer state (optimizer, data "
                                 f"position...), so it cannot be resumed; a run's own {LAST} always has it")
            _check_belongs(self.run_dir, ckpt)
            cfg = _merge_resume_config(ckpt["config"], cfg)
        elif self.run_dir.exists() and ((self.run_dir / LAST).exists() or (self.run_dir / BEST).exists()):
            raise UsageError(f"run directory {self.run_dir} already exists and is not empty; use --resume to "
                             f"continue it, or choose another --out")
        init = None  # train.init_from: the trained model this run starts from
        if ckpt is None and cfg.train.init_from:
            init, cfg = _start_from(cfg)
        self.cfg = cfg
        tc = cfg.train
        tune_allocator()  # reuse big freed buffers instead of page-faulting them in every step
        self.device = select_device(tc.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(tc.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise UsageError("train.precision=fp16 needs CUDA; on this device use bf16 or fp32")
        if self.precision == "bf16" and not autocast_available(self.device.type):
            raise UsageError(f"train.precision=bf16 needs autocast on {self.device.type}, which PyTorch "
                             f"{torch.__version__} does not have; use train.precision=fp32 (or a newer PyTorch)")
        seed_everything(tc.seed)

        # Data: the vocabulary comes from the checkpoint on resume (or from the model a run starts
        # from), so ids never shift.
        if ckpt is not None or init is not None:
            if ckpt is not None and cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
                raise UsageError(f"this run's training data {cfg.data.path} is not found from {Path.cwd()}; "
                                 f"resume from the folder the run started in, or give the data's place: "
                                 f"--resume --data PATH")
            src = ckpt if ckpt is not None else init
            vocab = Vocab.from_dict(src["vocab"])
            tok_settings = src["vocab"].get("tokenizer")
            tok = Tokenizer(**tok_settings) if tok_settings else Tokenizer.from_config(cfg.data, cfg.resolved_eos())
            corpus = self._rank0_first(lambda: load_corpus(cfg.data, cfg.resolved_eos(), vocab, tok), cfg.data)
        elif corpus is None:
            corpus = self._rank0_first(lambda: load_corpus(cfg.data, cfg.resolved_eos()), cfg.data)
        self.corpus = corpus
        self.vocab, self.tokenizer = corpus.vocab, corpus.tokenizer
        self.train_fingerprint = _fingerprint(corpus.train)
        # The cache key hashes every byte of the text; the fingerprint samples the ids.
        agreed = (self.train_fingerprint, corpus.cache_dir.name if corpus.cache_dir is not None else None)
        if self.dist.enabled and len(set(D.gather_objects(agreed, self.dist))) > 1:
            raise RunError("the processes read different training texts: a data file changed while they were "
                           "reading it (or the ranks see different files); start the run again")
        if ckpt is None and init is None and self.tokenizer.level == "char" and " " in self.vocab:
            head = corpus.train[:1_000_000] == self.vocab.stoi[" "]
            share = float(head.mean()) if head.size else 0.0
            runs = float((head[1:] & head[:-1]).mean()) if head.size > 1 else 0.0
            # prose ~0.17 spaces, Python source ~0.3 (in runs: indentation); "a e r _ b a n k": ~0.5, never two in a row
            if share > 0.4 and runs < 0.01:
                self._log(f"[yellow]warning:[/] {share:.0%} of the training characters are spaces, as in text of "
                          f"space-separated characters (PTB-char's `a e r _ b a n k`); the spaces are tokens at "
                          f"char level. For such text use data.level=word, where each character is one token")
        if ckpt is not None and ckpt["trainer"].get("train_fingerprint") not in (None, self.train_fingerprint):
            self._log(f"[yellow]warning:[/] the training text differs from the one this run was trained on (now "
                      f"{len(corpus.train):,} tokens): {LAST}'s data position (epoch {ckpt['epoch'] + 1}, window "
                      f"{ckpt['trainer']['window']}) refers to the old text; training goes on with the new one")
        self.train_data = self._my_columns(batchify(with_start(corpus.train), tc.batch_size))       # (T, B)
        self._bounds_epoch: int | None = None
        self._plan_epoch(0)  # the windows of the first epoch (or of the epoch a resume continues, below)
        self.bidirectional = cfg.model.bidirectional
        # Zero-state practice (see TrainConfig.state_resets): text without <eos> markers gives the model
        # no start it has learned, and a prime fed from the zero state can derail a sample. The value in
        # use is recorded in the config (config.yaml, checkpoints), so a resumed run keeps it.
        if tc.state_resets is None:
            tc.state_resets = cfg.resolved_eos() == "none" and tc.batch_size >= STATE_RESETS_MIN_BATCH
        self.state_resets = tc.state_resets
        if self.bidirectional:  # the backward stack reads the reversed text
            self.train_data_rev = self._my_columns(
                batchify(with_start(np.ascontiguousarray(corpus.train[::-1])), tc.batch_size))
        if self.device.type != "cpu":
            # The compact (int32) stream lives on the GPU: a window is a slice there, with no
            # host-to-device copy per step (a copy from pageable memory that waits for the device).
            self.train_data = self.train_data.to(self.device)
            if self.bidirectional:
                self.train_data_rev = self.train_data_rev.to(self.device)
        self.valid = corpus.get("valid")
        if self.valid is not None and tc.eval_max_tokens:
            self.valid = self.valid[: tc.eval_max_tokens]

        self.model = RNNLM(len(self.vocab), cfg.model).to(self.device)
        self.init_note = ""
        if init is not None:
            try:
                self.model.load_state_dict(init["model"])
            except (RuntimeError, KeyError, TypeError, ValueError) as e:
                raise UsageError(f"train.init_from: the weights in {init['path']} do not match its config and "
                                 f"vocabulary ({str(e).strip().splitlines()[0][:200]})") from None
            n_oov, n_train = corpus.oov.get("train", 0), len(corpus.train)
            self.init_note = (f"starting from {init['path']} (step {init.get('step', '?')} of its run); its vocabulary "
                              f"of {len(self.vocab):,} and tokenizer are kept: {n_oov:,} of the {n_train:,} training "
                              f"tokens ({n_oov / max(1, n_train):.1%}) are outside it and read as <unk>")
        if self.model.adaptive and cfg.model.adaptive_cutoffs and list(cfg.model.adaptive_cutoffs) != self.model.cutoffs:
            # cutoffs that did not fit the vocabulary (warned above): the run's config.yaml and its
            # checkpoints record the ones in use, so loading the model does not warn again
            cfg.model.adaptive_cutoffs = list(self.model.cutoffs)
        self.optimizer = build_optimizer(self.model, tc)
        total = tc.max_steps or self.total_windows()
        self.schedule = LRSchedule(tc, total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.step_module: nn.Module = _StepModule(self.model, tc.ar, tc.tar)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            # An adaptive softmax leaves a tail cluster out of a step whose window has no target in
            # it: DDP must then be told that some parameters may get no gradient.
            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.model.adaptive)
            if self.dist.rank:  # distinct dropout masks per rank; rank 0 keeps a plain run's stream
                torch.manual_seed(tc.seed + 1_000_003 * self.dist.rank)
        if tc.compile:
            self.step_module = torch.compile(self.step_module)
        # Plain SGD on CPU: clipping and the update in one pass over the weights, and -- where the
        # embedding is not shared with the output layer or across processes -- sparse embedding
        # gradients, so a step touches only the rows of its window's tokens instead of zero-filling,
        # norming, scaling and updating the whole (V, E) matrix. Same arithmetic (tests).
        self.fused_sgd = (self.device.type == "cpu" and plain_sgd(self.optimizer) and not self.scaler.is_enabled()
                          and not tc.compile)
        self.model.embedding.sparse = bool(self.fused_sgd and not self.dist.enabled and not cfg.model.tie_weights)
        # On a GPU, each training step recorded once as a CUDA graph and replayed (train.cuda_graphs).
        self.params = list(self.model.parameters())
        self.clip = tc.clip_grad_norm if tc.clip_grad_norm is not None else math.inf
        self.graphed: GraphedStep | None = None
        longest = int(np.diff(self._bounds).max()) if len(self._bounds) > 1 else tc.bptt
        blocker = graph_blocker(self.device, self.precision, self.dist.enabled, tc.compile, self.model.adaptive,
                                plain_loss=_plain_loss(self.device, longest * self.train_data.size(1) * len(self.vocab)),
                                variable_bptt=tc.variable_bptt)
        if tc.cuda_graphs and blocker:
            self._log(f"[yellow]warning:[/] train.cuda_graphs=true is not used: {escape(blocker)}")
        if tc.cuda_graphs is not False and not blocker:
            self.graphed = GraphedStep(self.step_module, self.params, self.clip, self._autocast, tc.bptt,
                                       warn=lambda msg: self._log(f"[yellow]warning:[/] {escape(msg)}"))

        # Progress counters (restored on resume).
        self.step = 0
        self.tokens = 0
        self.epoch = 0
        self.window = 0
        self.elapsed = 0.0        # wall seconds of previous sessions
        self.projected_steps: int | None = None  # with max_time: the step where the time runs out
        self.train_seconds = 0.0  # seconds spent in training steps (evaluation excluded)
        self.best_loss = math.inf
        self.best_step = None
        self.bad_evals = 0
        self.clipped = 0
        self.state = None
        self.state_rev = None
        self.last_eval_step = -1
        # Weight averaging (train.averaging=nt): the validation losses before it starts, and once it
        # has, the running mean of every parameter over the steps since (fp32, on the device).
        self.avg_params = list(self.model.parameters())
        self.val_history: list[float] = []
        self.avg: list[torch.Tensor] | None = None
        self.avg_count = 0
        self.avg_start: int | None = None
        self.cut_note = ""
        if ckpt is not None:
            self._restore(ckpt)
            self._plan_epoch(self.epoch)
            was = ckpt["config"].get("train", {})
            keys = ("bptt", "variable_bptt") + (("seed",) if tc.variable_bptt and was.get("variable_bptt") else ())
            changed = [f"train.{k}" for k in keys if k in was and was[k] != getattr(tc, k)]
            if changed and self.window > 0:
                self.cut_note = (f"{', '.join(changed)} changed in the middle of epoch {self.epoch + 1}: its windows are "
                                 f"cut differently now and training goes on at window {self.window} of the new cut, "
                                 f"so part of this epoch's text is skipped or trained twice")

        self.progress_enabled = progress
        self._stop_signal: str | None = None
        self.stop_reason = ""

    def _plan_epoch(self, epoch: int) -> None:
        """The window boundaries of `epoch` (data.window_bounds): fixed bptt windows, or with
        train.variable_bptt the epoch's own draw of lengths. Sets n_windows."""
        tc = self.cfg.train
        if self._bounds_epoch is not None and (self._bounds_epoch == epoch or not tc.variable_bptt):
            return
        self._bounds = window_bounds(self.train_data.size(0) - 1, tc.bptt,
                                     tc.seed if tc.variable_bptt else None, epoch)
        self._bounds_epoch = epoch
        self.n_windows = len(self._bounds) - 1

    def total_windows(self) -> int:
        """Windows in all train.epochs epochs (with train.variable_bptt each epoch has its own count)."""
        tc = self.cfg.train
        if not tc.variable_bptt:
            return tc.epochs * self.n_windows
        n = self.train_data.size(0) - 1
        return sum(len(window_bounds(n, tc.bptt, tc.seed, e)) - 1 for e in range(tc.epochs))

    def _rank0_first(self, load: Callable[[], Corpus], data_cfg) -> Corpus:
        """`load()`; under torchrun, for a text rnnlm gathers itself (data.glob, the default corpus),
        on rank 0 first -- which gathers, encodes and caches it alone -- then on the other ranks,
        which find it in the cache. A failure on rank 0 is every rank's: the others raise it too
        instead of waiting for a rank that has gone. Plain files load on all ranks at once (the
        ranks compare what they read afterwards, in __init__)."""
        if not self.dist.enabled or (data_cfg.path is not None and data_cfg.glob is None):
            return load()
        corpus = err = None
        if self.dist.is_main:
            try:
                corpus = load()
            except Exception as e:  # noqa: BLE001 - told to every rank, then raised here as it was
                err = e
        said = D.broadcast_object(None if err is None else (isinstance(err, UsageError), str(err) or type(err).__name__),
                                  self.dist)
        if err is not None:
            raise err
        if said is not None:
            usage, msg = said
            raise UsageError(msg) if usage else RunError(f"rank 0 could not load the data: {msg or 'no message'}")
        return corpus if corpus is not None else load()

    # -- state ---------------------------------------------------------------------------------
    def _payload(self, with_trainer_state: bool) -> dict:
        d = {"model": self.model.state_dict(), "config": {"name": self.cfg.name, **self.cfg.to_dict()},
             "vocab": self.vocab.to_dict(self.tokenizer), "rnnlm_version": __version__,
             "step": self.step, "tokens": self.tokens, "epoch": self.epoch,
             "best_valid_loss": self.best_loss if math.isfinite(self.best_loss) else None}
        if with_trainer_state:
            # Every rank contributes its columns of the carried state and its RNG state, so the
            # checkpoint is the same as a single process's (and resumes on any number of ranks).
            rngs = D.gather_objects(rng_state(), self.dist)
            states = D.gather_objects(state_to_list(self.state), self.dist)
            states_rev = D.gather_objects(state_to_list(self.state_rev), self.dist)
            d["trainer"] = {
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                "window": self.window, "elapsed": self.elapsed + self._session_time(),
                "train_seconds": self.train_seconds, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "clipped": self.clipped, "last_eval_step": self.last_eval_step,
                "state": _cat_states(states), "state_rev": _cat_states(states_rev),
                "train_fingerprint": self.train_fingerprint,
                "averaging": {"history": list(self.val_history), "start_step": self.avg_start,
                              "count": self.avg_count,
                              "mean": None if self.avg is None else [a.detach().cpu() for a in self.avg]},
            }
        return d

    def _restore(self, ck: dict) -> None:
        t = ck["trainer"]
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise UsageError(f"cannot resume: {LAST} does not match the config ({str(e).splitlines()[0]})") from None
        # The saved param groups carry the implementation flags of the machine that wrote them (fused,
        # foreach); keep the ones chosen for this machine, so a checkpoint moves between CPU, CUDA, MPS.
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(t["optimizer"])
        for g, flags in zip(self.optimizer.param_groups, impl):
            g.update(flags)
        self.schedule.load_state_dict(t["schedule"])
        if self.cfg.train.max_time is None:  # resumed without a time budget: no projected end to keep
            self.schedule.set_horizon(None)
        if t.get("scaler"):
            self.scaler.load_state_dict(t["scaler"])
        set_lr(self.optimizer, self.schedule.lr)
        self.step, self.tokens, self.epoch = ck["step"], ck["tokens"], ck["epoch"]
        self.window = t["window"]
        self.elapsed, self.train_seconds = t["elapsed"], t["train_seconds"]
        self.best_loss = ck["best_valid_loss"] if ck["best_valid_loss"] is not None else math.inf
        self.best_step, self.bad_evals, self.clipped = t["best_step"], t["bad_evals"], t["clipped"]
        self.last_eval_step = t["last_eval_step"]
        self.state = state_from_list(self._my_state_columns(t["state"]), self.cfg.model.cell, self.device)
        self.state_rev = state_from_list(self._my_state_columns(t["state_rev"]), self.cfg.model.cell, self.device)
        av = t.get("averaging") or {}
        self.val_history = list(av.get("history") or [])
        if av.get("mean") is not None and self.cfg.train.averaging == "nt":
            mean = av["mean"]
            if len(mean) != len(self.avg_params) or any(m.shape != p.shape for m, p in zip(mean, self.avg_params)):
                raise UsageError(f"cannot resume: the weight average in {LAST} does not match the model")
            self.avg = [m.to(self.device, torch.float32) for m in mean]
            self.avg_count, self.avg_start = av["count"], av["start_step"]
        ranks = t.get("rng_ranks") or [t["rng"]]
        set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world_size else t["rng"])

    def _session_time(self) -> float:
        return time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0

    def _now(self) -> float:
        return self.elapsed + self._session_time()

    def save(self, name: str) -> None:
        """Write a checkpoint (collective under torchrun: every rank calls it, rank 0 writes)."""
        payload = self._payload(with_trainer_state=name == LAST)
        if self.dist.is_main:
            save_checkpoint(self.run_dir / name, payload)

    def _my_columns(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the batch columns (all of them in a single process)."""
        if not self.dist.enabled:
            return data
        b = data.size(1) // self.dist.world_size
        return data[:, self.dist.rank * b:(self.dist.rank + 1) * b].contiguous()

    def _my_state_columns(self, items):
        if items is None or not self.dist.enabled:
            return items
        b = items[0].size(1) // self.dist.world_size
        return [t[:, self.dist.rank * b:(self.dist.rank + 1) * b].contiguous() for t in items]

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, ids: np.ndarray) -> dict:
        return evaluate_ids(self.model, ids, self.cfg.train.eval_batch_size, self.device,
                            autocast_dtype=self.amp_dtype if self.amp_dtype == torch.bfloat16 else None)

    def _eval_event(self, split: str, res: dict) -> dict:
        ev = {"event": "eval", "step": self.step, "tokens": self.tokens, "time": round(self._now(), 3),
              "split": split, "loss": res["loss"], "ppl": res["ppl"]}
        if self.tokenizer.level == "char":
            ev["bpc"] = res["bits_per_token"]
        for k in ("forward_ppl", "backward_ppl"):
            if k in res:
                ev[k] = res[k]
        return ev

    # -- the loop ------------------------------------------------------------------------------
    def _carry(self, state):
        """The state carried into the next window: detached (truncated BPTT) and, with state resets, one
        batch column zeroed, global column `step % B` of the B = train.batch_size columns (under DDP
        only the rank holding it resets it), so each column restarts every B steps, however many
        processes share them; a function of the step, so a resumed run resets the same columns."""
        state = detach_state(state)
        if state is None or not self.state_resets:
            return state
        b = (state[0] if isinstance(state, tuple) else state).size(1)  # this rank's columns
        j = self.step % (b * self.dist.world_size) - self.dist.rank * b
        return reset_column(state, j) if 0 <= j < b else state

    def fit(self) -> dict:
        D.barrier(self.dist)  # every rank has checked the run directory before rank 0 writes into it
        lock = RunLock(self.run_dir)
        if self.dist.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create the run directory {self.run_dir}: {e.strerror or e}; "
                                 f"choose another --out") from None
            lock.acquire()
        try:
            return self._fit()
        finally:
            lock.release()
            if self.dist.enabled:
                D.shutdown()

    def _log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self.console is not None:
            self.console.print(msg, highlight=False)
        else:  # used as a library without a rich console: the text without its markup
            from rich.text import Text
            print(Text.from_markup(msg).plain, file=sys.stderr, flush=True)

    def _fit(self) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        if not self.resume and self.dist.is_main:
            # A directory left by a run killed before its first checkpoint starts over cleanly.
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
            self.vocab.save(self.run_dir / "vocab.json", self.tokenizer)
            if self.default_run_dir:
                _point_latest(self.run_dir)
        if self.resume and self.dist.is_main:
            _trim_metrics(self.run_dir / "metrics.jsonl", self.step)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.dist.is_main else None, tc.tensorboard, self._log)
        n_params = self.model.num_parameters()
        n_proc = self.dist.world_size
        procs = f" · {n_proc} process{'es' if n_proc != 1 else ''} ({D.backend()})" if self.dist.enabled else ""
        self._log(f"[bold]rnnlm[/] {'resuming' if self.resume else 'training'} {cfg.model.cell} "
                  f"{cfg.model.num_layers}x{cfg.model.hidden_size}"
                  f"{' bidirectional' if self.bidirectional else ''} · {n_params:,} parameters · "
                  f"vocab {len(self.vocab):,} ({self.tokenizer.level}) · {len(self.corpus.train):,} train tokens · "
                  f"device {self.device} {self.precision}{' (auto)' if tc.precision == 'auto' else ''}"
                  f"{' · CUDA graphs' if self.graphed is not None else ''}{procs}")
        cache = ("ids from the cache" if self.corpus.cached else
                 "encoded now, cached" if self.corpus.cache_dir is not None else "encoded now, not cached")
        self._log(f"data: {escape(self.corpus.description)} ({cache}) · run directory: {escape(str(self.run_dir))}")
        if self.init_note and not self.resume:
            self._log(escape(self.init_note))
        if self.resume:
            done = self._should_stop(at_log=True) or ("epochs" if self.epoch >= tc.epochs else "")
            if done:  # nothing to train: leave the finished run exactly as it is
                self._log(f"nothing to do: the run is at step {self.step} and already meets its stop condition "
                          f"({done}); raise train.max_steps, train.epochs or train.max_time to go on")
                metrics.close()
                return {"event": "end", "step": self.step, "tokens": self.tokens, "stop_reason": done,
                        "best_valid_loss": self.best_loss if math.isfinite(self.best_loss) else None,
                        "trained": False}
            self._log(f"continuing at step {self.step}, epoch {self.epoch + 1}, window {self.window}")
            if self.cut_note:
                self._log(f"[yellow]warning:[/] {escape(self.cut_note)}")
            if self.dist.is_main:  # the config in force now (train.* or data.path may have changed)
                try:
                    atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
                except OSError as e:  # the checkpoints carry the config too; a failing disk stops at the next save
                    self._log(f"[yellow]warning:[/] could not update config.yaml: {escape(e.strerror or str(e))}")

        if tc.averaging == "nt" and (self.valid is None or tc.eval_every == 0):
            why = ("has no validation split" if self.valid is None else
                   "validates only at its end (train.eval_every=0)")
            self._log(f"[yellow]warning:[/] train.averaging=nt starts from validation losses, and this run {why}: "
                      f"its weights will not be averaged")
        self._t0 = time.perf_counter()
        self._step0 = self.step
        old_handlers = self._install_signal_handlers()
        params, clip = self.params, self.clip
        stats = _StepStats(self.device, clip)
        interval_steps, interval_tokens, interval_time = 0, 0, 0.0
        bar = _Progress(self, enabled=self.progress_enabled if self.dist.is_main else False)
        stop = False
        self.stop_reason = ""
        set_lr(self.optimizer, self.schedule.lr)
        self.step_module.train()
        try:
            while self.epoch < tc.epochs and not stop:
                if self.window == 0:
                    self.state = self.state_rev = None  # a⁰ = 0 at the start of every epoch
                self._plan_epoch(self.epoch)
                for i in range(self.window, self.n_windows):
                    t_step = time.perf_counter()
                    skipped = False
                    lr = self.schedule.on_step(self.step)
                    # variable windows: a longer window's mean loss gets a proportionally larger step
                    # (AWD-LSTM), so every token weighs about the same; the log shows the schedule's lr
                    lr_step = lr * int(self._bounds[i + 1] - self._bounds[i]) / tc.bptt if tc.variable_bptt else lr
                    set_lr(self.optimizer, lr_step)
                    if self.graphed is not None:  # forward, backward and clipping replayed from a CUDA graph
                        xy = window(self.train_data, self._bounds, i)
                        xyb = window(self.train_data_rev, self._bounds, i) if self.bidirectional else None
                        loss, gnorm, self.state, self.state_rev = self.graphed.step(
                            xy, self._carry(self.state), xyb, self._carry(self.state_rev))
                        self.optimizer.step()
                        n_x = xy[1:].numel()
                    else:
                        x, y = get_window(self.train_data, self._bounds, i)
                        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                        self.optimizer.zero_grad(set_to_none=True)
                        xb = yb = None
                        if self.bidirectional:
                            xb, yb = get_window(self.train_data_rev, self._bounds, i)
                            xb, yb = xb.to(self.device), yb.to(self.device)
                        with self._autocast():
                            obj, loss, self.state, self.state_rev = self.step_module(
                                x, y, self._carry(self.state), xb, yb, self._carry(self.state_rev))
                        self.scaler.scale(obj).backward()
                        if self.fused_sgd:  # clip + SGD in one pass (and sparse embedding rows)
                            gnorm = clipped_sgd_step(params, lr_step, clip)
                        else:
                            self.scaler.unscale_(self.optimizer)
                            gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
                            scale = self.scaler.get_scale() if self.avg is not None and self.scaler.is_enabled() else 0
                            self.scaler.step(self.optimizer)
                            self.scaler.update()
                            # fp16: a step GradScaler skipped (inf/NaN gradients; it lowers the scale)
                            # left the weights as they were, and is not averaged in twice
                            skipped = self.scaler.get_scale() < scale if scale else False
                        n_x = x.numel()
                    self.step += 1
                    if self.avg is not None and not skipped:
                        self._average_step()
                    stats.add(self.step, loss, gnorm)  # no host sync until the next log line
                    self.window = i + 1
                    n_tok = n_x * self.dist.world_size  # global tokens (all ranks)
                    self.tokens += n_tok
                    interval_steps += 1
                    interval_tokens += n_tok
                    dt = time.perf_counter() - t_step
                    interval_time += dt
                    self.train_seconds += dt

                    last_window = self.window >= self.n_windows
                    at_log = self.step % tc.log_every == 0 or last_window
                    reason = self._should_stop(at_log=at_log)
                    if at_log or reason:
                        loss_sum, gnorm_sum, clipped, first_bad = stats.take()
                        if self.dist.enabled:  # the global mean over all ranks' tokens
                            for acc in (loss_sum, clipped):
                                D.all_reduce_mean(acc, self.dist)
                            D.all_reduce_first_step(first_bad, self.dist)
                        self._check_finite(first_bad)
                        self.clipped += round(clipped.item())
                        # Those reads waited for the device (a GPU runs behind the host that queues
                        # its work): that wait is training time too.
                        lag = time.perf_counter() - t_step - dt
                        interval_time += lag
                        self.train_seconds += lag
                        ev = {"event": "train", "step": self.step, "tokens": self.tokens,
                              "time": round(self._now(), 3), "epoch": self.epoch + 1,
                              "loss": loss_sum.item() / interval_steps, "lr": lr,
                              "grad_norm": gnorm_sum.item() / interval_steps,
                              "tokens_per_sec": interval_tokens / max(interval_time, 1e-9)}
                        metrics.write(ev)
                        self._project_horizon()
                        bar.update(ev)
                        interval_steps, interval_tokens, interval_time = 0, 0, 0.0

                    validate = bool(tc.eval_every) and self.step % tc.eval_every == 0 and not last_window
                    if validate or (tc.save_every and self.step % tc.save_every == 0):
                        wait = self._pending_checked(stats)  # the device finishing queued steps
                        self.train_seconds += wait
                        interval_time += wait
                        if validate:
                            self._validate(metrics, bar)
                            reason = reason or self._should_stop(at_log=True)
                        else:
                            self.save(LAST)
                    if reason:
                        self.stop_reason = reason
                        stop = True
                        break
                if not stop:  # the epoch is complete
                    self.train_seconds += self._pending_checked(stats)
                    self.epoch += 1
                    self.window = 0
                    self.schedule.on_epoch_end(self.epoch)
                    if tc.eval_every != 0:  # 0: validate only when training ends
                        self._validate(metrics, bar)
                    if not self.stop_reason:
                        self.stop_reason = self._should_stop(at_log=True) or ""
                    stop = bool(self.stop_reason) and self.epoch < tc.epochs
            if not self.stop_reason:
                self.stop_reason = "epochs"
            self.train_seconds += self._pending_checked(stats)
            if self.last_eval_step != self.step and not self._stop_signal:  # Ctrl-C: save and go, no eval
                self._validate(metrics, bar)
            self.save(LAST)
            if self.valid is None or not (self.run_dir / BEST).exists():
                with self._averaged():
                    self.save(BEST)  # without validation data the final weights are the best we know
        except BaseException:
            metrics.close()
            raise
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)

        end = {"event": "end", "step": self.step, "tokens": self.tokens, "time": round(self._now(), 3),
               "best_valid_loss": self.best_loss if math.isfinite(self.best_loss) else None,
               "best_valid_ppl": _exp(self.best_loss) if math.isfinite(self.best_loss) else None,
               "train_tokens_per_sec": self.tokens_per_sec_overall(),
               "clipped_fraction": self.clipped / max(1, self.step), "stop_reason": self.stop_reason,
               "epochs_completed": self.epoch}
        if self.cfg.train.averaging != "none":
            end["averaging_from_step"] = self.avg_start
        if self.tokenizer.level == "char" and end["best_valid_loss"] is not None:
            end["best_valid_bpc"] = end["best_valid_loss"] / math.log(2)
        metrics.write(end)
        metrics.close()
        if not self.dist.is_main:
            return end
        try:
            from .plot import plot_run
            plot_run(self.run_dir)
        except Exception as e:  # a missing plotting backend must not fail a finished run
            self._log(f"[yellow]note:[/] could not draw loss.png ({escape(str(e))})")
        if self._stop_signal:
            self._log(f"[yellow]stopped by {self._stop_signal}[/] at step {self.step}; {LAST} saved. Resume with:\n"
                      f"  rnnlm train --resume --out {escape(str(self.run_dir))}")
        if math.isfinite(self.best_loss):
            best = f"best valid loss {self.best_loss:.4f} (ppl {_ppl_text(self.best_loss)})"
        else:
            best = (f"no validation split ({BEST} holds the last weights)" if self.valid is None else
                    f"not validated ({BEST} holds the last weights)")
        self._log(f"done: {self.step} steps, {self.tokens:,} tokens, {self._now():.1f} s "
                  f"({end['train_tokens_per_sec']:,.0f} tokens/s); {best}; stopped by {self.stop_reason}")
        return end

    def _project_horizon(self) -> None:
        """With train.max_time: the step at which the time runs out, projected from this session's
        pace so far (evaluations included; rank 0's clock under torchrun, so every rank uses the
        same lr). A cosine schedule ends there; the progress line counts to it."""
        tc = self.cfg.train
        if tc.max_time is None:
            return
        proj = None
        done, secs = self.step - self._step0, self._session_time()
        if self.dist.is_main and done > 0 and secs > 0:
            proj = self.step + int(max(0.0, tc.max_time - self._now()) * done / secs)
        proj = D.broadcast_object(proj, self.dist)
        if proj is not None:
            self.projected_steps = proj
            if self.schedule.kind == "cosine":
                self.schedule.set_horizon(proj)

    def tokens_per_sec_overall(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def _pending_checked(self, stats: "_StepStats") -> float:
        """Before a validation or a save: check the steps not yet logged for a non-finite loss
        (agreed by all ranks, so none is left waiting in a collective), which also waits for the
        device to finish them; return the seconds that wait took (training time)."""
        t = time.perf_counter()
        first_bad = stats.first_bad()
        D.all_reduce_first_step(first_bad, self.dist)
        self._check_finite(first_bad)
        return time.perf_counter() - t

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad.item())
        if bad >= 0:
            saved = (f"The last good checkpoint is in {self.run_dir}" if (self.run_dir / LAST).exists()
                     else "No checkpoint had been written yet")
            raise RunError(f"the training loss became non-finite at step {bad}; stopped without saving it. {saved}. "
                           f"Try a lower train.lr or a smaller train.clip_grad_norm")

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _should_stop(self, at_log: bool = True) -> str:
        """Why training should stop now ('' = go on). Under torchrun every rank must agree, so the
        time- and signal-based reasons are decided by rank 0 at log steps and broadcast."""
        tc = self.cfg.train
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return "max_steps"
        if tc.early_stopping_patience is not None and self.bad_evals >= tc.early_stopping_patience:
            return "early_stopping"
        if self.dist.enabled and not at_log:
            return ""
        reason = ""
        if self._stop_signal:
            reason = self._stop_signal
        elif tc.max_time is not None and self._now() >= tc.max_time:
            reason = "max_time"
        reason = D.broadcast_object(reason, self.dist)
        if reason.startswith("SIG"):
            self._stop_signal = reason
        return reason

    # -- weight averaging (NT-ASGD) --------------------------------------------------------------
    def _average_step(self) -> None:
        """Fold the weights after this optimizer step into the running mean."""
        self.avg_count += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.avg, [p.detach() for p in self.avg_params], 1.0 / self.avg_count)

    def _maybe_start_averaging(self, loss: float) -> None:
        """NT-ASGD's trigger (Merity et al. 2018): start averaging when this validation loss is worse
        than the best of those more than train.averaging_patience evaluations back."""
        if self.avg is not None:
            return
        n = self.cfg.train.averaging_patience
        if len(self.val_history) > n and loss > min(self.val_history[:-n]):
            self.avg = [p.detach().float().clone() for p in self.avg_params]
            self.avg_count, self.avg_start = 1, self.step
            self._log(f"step {self.step}: validation loss {loss:.4f} is worse than the best of the evaluations more "
                      f"than {n} back ({min(self.val_history[:-n]):.4f}): averaging the weights from here on "
                      f"(NT-ASGD); validation and {BEST} use the average")
        self.val_history.append(loss)

    @contextmanager
    def _averaged(self):
        """The running mean of the weights in the model's parameters for the duration (in place, so
        a CUDA graph's captured addresses stay valid); the raw weights back afterwards."""
        if self.avg is None:
            yield
            return
        params = [p.detach() for p in self.avg_params]
        with torch.no_grad():
            raw = [p.clone() for p in params]
        try:
            with torch.no_grad():
                torch._foreach_copy_(params, self.avg)
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)

    def _validate(self, metrics: MetricsLog, bar: "_Progress") -> None:
        """Evaluate on the validation split (the weights' running mean once averaging has started),
        adjust the lr, save best/last."""
        self.last_eval_step = self.step
        if self.valid is None:
            self.save(LAST)
            return
        averaged = self.avg is not None
        with self._averaged():
            t0 = time.perf_counter()
            res = D.broadcast_object(self.evaluate(self.valid), self.dist)  # every rank takes rank 0's branch
            ev = self._eval_event("valid", res)
            ev["seconds"] = round(time.perf_counter() - t0, 3)   # what the validation took (not counted as training)
            if averaged:
                ev["averaged"] = True
            metrics.write(ev)
            bar.eval(ev)
            loss = res["loss"]
            if not math.isfinite(loss):
                raise RunError(f"the validation loss is {loss} at step {self.step}; stopped without saving. Try a "
                               f"lower train.lr or a smaller train.clip_grad_norm")
            improved = loss < self.best_loss
            if improved:
                self.best_loss, self.best_step, self.bad_evals = loss, self.step, 0
                self.save(BEST)
            else:
                self.bad_evals += 1
        if self.cfg.train.averaging == "nt":
            self._maybe_start_averaging(loss)
        set_lr(self.optimizer, self.schedule.on_eval(improved))
        self.save(LAST)

    # -- signals -----------------------------------------------------------------------------
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal:  # a second Ctrl-C: stop now (the last checkpoint on disk is intact)
                raise KeyboardInterrupt
            self._stop_signal = name
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is signal.SIG_IGN:  # ignored by whoever started us (`cmd &` in a script)
                continue
            old[s] = signal.signal(s, handler)
        return old

    def _restore_signal_handlers(self, old) -> None:
        if old:
            for s, h in old.items():
                signal.signal(s, h)


class _StepStats:
    """Each step's loss and gradient norm, held as device tensors until the log line reads them.

    Keeping a reference launches no kernel and waits for nothing, so on a GPU the host runs ahead
    of the device between log lines; the arithmetic (sums, clip count, the first non-finite loss)
    runs once per log line, or per `chunk` steps, whichever comes first, to bound what is held.
    """

    def __init__(self, device: torch.device, clip: float, chunk: int = 256):
        self.clip, self.chunk = clip, chunk
        self.loss_sum = torch.zeros((), device=device)
        self.gnorm_sum = torch.zeros((), device=device)
        self.clipped = torch.zeros((), device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, or -1
        self.losses: list[torch.Tensor] = []
        self.gnorms: list[torch.Tensor] = []
        self.step0 = 0  # the step number of losses[0]

    def add(self, step: int, loss: torch.Tensor, gnorm: torch.Tensor) -> None:
        if not self.losses:
            self.step0 = step
        self.losses.append(loss.detach())
        self.gnorms.append(gnorm.detach())
        if len(self.losses) >= self.chunk:
            self._fold()

    def _fold(self) -> None:
        if not self.losses:
            return
        losses = torch.stack(self.losses).float()
        gnorms = torch.stack(self.gnorms).float()
        bad = ~torch.isfinite(losses)
        here = torch.where(bad.any(), bad.float().argmax() + self.step0, -1)
        self.first = torch.where(self.first < 0, here, self.first)
        self.loss_sum += losses.sum()
        self.gnorm_sum += gnorms.sum()
        self.clipped += (gnorms > self.clip).sum()
        self.losses, self.gnorms = [], []

    def first_bad(self) -> torch.Tensor:
        """The step number of the first non-finite loss not yet reported (-1: none)."""
        self._fold()
        return self.first

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss sum, gradient-norm sum, clipped steps, first non-finite step) since the last take."""
        self._fold()
        out = self.loss_sum, self.gnorm_sum, self.clipped, self.first
        self.loss_sum, self.gnorm_sum, self.clipped = (torch.zeros_like(t) for t in out[:3])
        self.first = torch.full_like(self.first, -1)
        return out


def _ppl_text(loss: float, digits: int = 2) -> str:
    """The perplexity for a progress line: beyond e^50 (~5e21) not a number worth printing in full."""
    return f"{math.exp(loss):.{digits}f}" if loss < 50 else ">5e21"


def _point_latest(run_dir: Path) -> None:
    """Keep runs/latest pointing at the newest default run directory (best effort)."""
    link = run_dir.parent / "latest"
    try:
        tmp = run_dir.parent / f".latest.{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass


class _StepModule(nn.Module):
    """One training step's forward pass and loss (both directions for a bidirectional model).

    Wrapping loss computation in one module gives DistributedDataParallel and torch.compile a
    single forward call per step.
    """

    def __init__(self, model: RNNLM, ar: float = 0.0, tar: float = 0.0):
        super().__init__()
        self.model = model
        self.ar, self.tar = ar, tar

    def _one(self, x, y, state, direction: int):
        """(objective, cross-entropy, state) of one direction's window."""
        if not (self.ar or self.tar):
            h, state = self.model(x, state, direction)     # (T, B, D)
            loss = self.model.nll(h, y)
            return loss, loss, state
        h, raw, state = self.model.features(x, state, direction)
        loss = self.model.nll(h, y)
        obj = loss
        if self.ar:   # activation regularisation on the (dropped) features the softmax reads
            obj = obj + self.ar * h.float().pow(2).mean()
        if self.tar and raw.size(0) > 1:  # temporal: steps of the top layer's raw outputs
            obj = obj + self.tar * (raw[1:] - raw[:-1]).float().pow(2).mean()
        return obj, loss, state

    def forward(self, x, y, state, xb=None, yb=None, state_b=None):
        """-> (objective to backpropagate, cross-entropy, state, state_b); the two are one tensor
        unless train.ar / train.tar add their penalties to the objective."""
        obj, loss, state = self._one(x, y, state, 0)
        if xb is not None:                                   # backward stack over the reversed text
            obj_b, loss_b, state_b = self._one(xb, yb, state_b, 1)
            penalised = obj is not loss
            loss = 0.5 * (loss + loss_b)
            obj = 0.5 * (obj + obj_b) if penalised else loss
        return obj, loss, state, state_b


def _cat_states(per_rank: list):
    """Join the ranks' state columns (dim 1) into one full-batch state."""
    if per_rank[0] is None:
        return None
    if len(per_rank) == 1:
        return per_rank[0]
    return [torch.cat([r[k] for r in per_rank], dim=1) for k in range(len(per_rank[0]))]


def _fingerprint(ids: np.ndarray) -> str:
    """A cheap identity of a token stream: its length, ~1M evenly spaced ids and its tail."""
    h = hashlib.sha256(str(len(ids)).encode())
    h.update(np.ascontiguousarray(ids[:: max(1, len(ids) // 1_000_000)], dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(ids[-65536:], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _trim_metrics(path: Path, step: int) -> None:
    """On resume: drop the events logged after the checkpoint's step (the steps that are about to be
    trained again, after a crash or a failed save) and any torn last line, so the log has each step
    once."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return
    keep = []
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("step"), int) and ev["step"] <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def _check_belongs(run_dir: Path, ckpt: dict) -> None:
    """A last.pt copied in from another run must not take the directory over: its data/model
    settings and vocabulary must be those of the directory's config.yaml and vocab.json."""
    cfg_path, vocab_path = run_dir / "config.yaml", run_dir / "vocab.json"
    try:
        here = config_from_dict(load_yaml(cfg_path)) if cfg_path.is_file() else None
        tokens = json.loads(vocab_path.read_text(encoding="utf-8")).get("tokens") if vocab_path.is_file() else None
    except (UsageError, OSError, ValueError, AttributeError):
        return  # an unreadable side file proves nothing; the checkpoint itself was checked
    saved = config_from_dict(ckpt["config"])
    if here is not None:
        here.data.path = saved.data.path  # the one data.* key a resume may change
    if here is not None:  # the dropout settings may change on resume (config.yaml is rewritten first)
        here.model, saved.model = model_architecture(here.model), model_architecture(saved.model)
    differs = [s for s in ("data", "model") if here is not None and getattr(here, s) != getattr(saved, s)]
    if tokens is not None and tokens != ckpt["vocab"].get("tokens"):
        differs.append("vocabulary")
    if differs:
        raise UsageError(f"{run_dir / LAST} does not belong to this run directory: its {' and '.join(differs)} "
                         f"differ from {run_dir}'s config.yaml / vocab.json (was it copied from another run?); "
                         f"resume the run it came from, or start a new one")


def _inherit_model(saved: ModelConfig, given: Config, refusal: Callable[[str, Any, Any], str]) -> ModelConfig:
    """`saved` (the model a run continues) with the dropout settings `given` states; any other model.*
    key `given` states -- in its config file or a KEY=VALUE item, or at a non-default value -- must
    equal saved's, else UsageError(refusal(key, given value, saved value))."""
    defaults, stated = ModelConfig(), stated_keys(given)
    out = copy.deepcopy(saved)
    for f in dataclasses.fields(ModelConfig):
        k, v = f.name, getattr(given.model, f.name)
        if f"model.{k}" not in stated and v == getattr(defaults, k):
            continue  # not said: the continued model's value
        if k in MODEL_TRAINING_KEYS:
            setattr(out, k, v)
        elif v != getattr(saved, k):
            raise UsageError(refusal(k, v, getattr(saved, k)))
    return out


def _start_from(cfg: Config) -> tuple[dict, Config]:
    """train.init_from: the checkpoint a new run starts from, and `cfg` with that model's architecture
    and the data.* keys that fix its vocabulary and what its ids mean (VOCAB_KEYS). The dropout
    settings may differ (to fine-tune with other ones); a model.* or vocabulary key stated with
    another value is an error rather than silently ignored."""
    ck = load_checkpoint(resolve_checkpoint(cfg.train.init_from))
    where, saved = ck["path"], stored_config(ck)
    cfg.model = _inherit_model(saved.model, cfg, lambda k, v, theirs: (
        f"train.init_from: model.{k}={v} differs from the model's ({theirs}, in {where}): a run started from it "
        f"keeps its architecture; leave model.{k} out"))
    defaults, stated = Config().data, stated_keys(cfg)

    def resolved(k: str, v: Any) -> Any:
        return resolve_eos(v, saved.data.level) if k == "eos" else v
    for k in VOCAB_KEYS:
        v, theirs = getattr(cfg.data, k), getattr(saved.data, k)
        if (f"data.{k}" in stated or v != getattr(defaults, k)) and resolved(k, v) != resolved(k, theirs):
            raise UsageError(f"train.init_from: data.{k}={v} differs from the model's ({theirs}, in {where}): its "
                             f"vocabulary and what its ids mean are kept; leave data.{k} out")
        setattr(cfg.data, k, theirs)
    return ck, cfg


def _merge_resume_config(saved: dict, given: Config) -> Config:
    """The saved run's config with train.* changes from the command line (e.g. a larger max_steps)."""
    base = config_from_dict(saved)
    if "state_resets" not in saved.get("train", {}):  # a run started before state resets existed
        base.train.state_resets = False
    defaults = Config()
    # data.path alone may change: the same text moved, or a relative path seen from another folder
    # (a changed text is noticed by its fingerprint and warned about).
    if given.data.path is not None and given.data.path != base.data.path:
        base.data.path = given.data.path
    may = ("only train.*, sample.*, data.path (--data) and the dropout settings (model.dropout*, "
           "model.locked_dropout, model.weight_drop) may change (the saved run's values are in its config.yaml)")
    stated = stated_keys(given)
    for f in dataclasses.fields(type(defaults.data)):  # each other data.* key given must be the run's own
        k, v = f.name, getattr(given.data, f.name)
        if k != "path" and (f"data.{k}" in stated or v != getattr(defaults.data, k)) and v != getattr(base.data, k):
            raise UsageError(f"cannot change data.{k} when resuming (the run has {getattr(base.data, k)}, not {v}); "
                             f"{may}")
    base.model = _inherit_model(base.model, given, lambda k, v, theirs: (
        f"cannot change model.{k} when resuming (the run has {theirs}, not {v}); {may}"))
    explicit = getattr(given, "overridden", set())  # KEY=VALUE items, also those equal to the default
    changeable = [("train", k) for k in given.train.__dataclass_fields__]
    changeable += [("sample", k) for k in given.sample.__dataclass_fields__]
    for section, k in changeable:
        g, d = getattr(given, section), getattr(defaults, section)
        if getattr(g, k) != getattr(d, k) or f"{section}.{k}" in explicit:
            setattr(getattr(base, section), k, getattr(g, k))
    return base


class _Progress:
    """A rich progress bar on a terminal; plain periodic lines otherwise."""

    def __init__(self, trainer: Trainer, enabled: bool | None):
        self.t = trainer
        console = trainer.console
        if enabled is None:
            enabled = bool(console is not None and console.is_terminal)
        self.rich = None
        tc = trainer.cfg.train
        total = trainer.total_windows()
        if tc.max_steps:
            total = min(total, tc.max_steps)
        self.total = total
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self.rich = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=False)
            self.rich.start()
            self.task = self.rich.add_task("train", total=total, completed=trainer.step, info="")

    def update(self, ev: dict) -> None:
        ppl = _ppl_text(ev["loss"], 1)
        info = (f"epoch {ev['epoch']} loss {ev['loss']:.4g} ppl {ppl} lr {ev['lr']:.3g} "
                f"{ev['tokens_per_sec']:,.0f} tok/s")
        total = self.total  # with max_time, the projected last step when that comes first
        if self.t.projected_steps is not None:
            total = min(total, max(self.t.projected_steps, ev["step"]))
        if self.rich is not None:
            self.rich.update(self.task, total=total, completed=ev["step"], info=info)
        else:
            self.t._log(f"step {ev['step']}/{total} {info} |g| {ev['grad_norm']:.2f}")

    def eval(self, ev: dict) -> None:
        extra = (f" bpc {ev['bpc']:.3f}" if "bpc" in ev else "") + (" (weight average)" if ev.get("averaged") else "")
        msg = f"step {ev['step']}: valid loss {ev['loss']:.4f} ppl {_ppl_text(ev['loss'])}{extra}"
        if self.rich is not None:
            self.rich.console.print(msg, highlight=False)
        else:
            self.t._log(msg)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()
            self.rich = None


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False, console=None) -> dict:
    """Convenience wrapper: build a Trainer and fit."""
    return Trainer(cfg, run_dir, resume, console=console).fit()
