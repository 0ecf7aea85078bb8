"""Training steps as CUDA graphs: the step's kernels are recorded once and replayed.

A 2x200 LSTM with a batch of 20 gives a GPU almost nothing to do per kernel: the time of a step
is the host's time to issue its few hundred launches (forward, loss, backward, clipping). A
CUDA graph (``torch.cuda.CUDAGraph``) records them once and replays them with one launch, so
the step costs what the device takes to run it.

:class:`GraphedStep` is one training step -- forward, loss, backward, gradient clipping -- in
that form. Around it, per step: one copy of the window's tokens into the graph's input buffer,
the replay, one copy of the (loss, gradient norm) pair out of it, and the optimizer's own step,
which stays outside the graph so that learning-rate schedules and every optimizer work as
they do without graphs. The carried state is written back into the graph's input buffer at the
end of each replay, so carrying it costs nothing.

What a graph needs, and how it is met:

* the same shapes every replay: a window of another length (the short last window of an epoch)
  runs eagerly, into the same gradient buffers;
* warm-up before capture (lazy cuBLAS/cuDNN set-up): the first WARMUP_STEPS steps of a session
  run eagerly on the capture stream -- real training steps, nothing is thrown away;
* no host synchronisation inside the step: fp16 (its GradScaler reads an overflow flag each
  step), an adaptive softmax (clusters chosen on the host from the targets), windows of 2^25
  logits or more (the fused loss's rare-row fix-up), DDP and torch.compile are left to the eager
  loop (:func:`graph_blocker`);
* random numbers: PyTorch's default CUDA generator is graph-safe, so dropout masks are drawn
  fresh at each replay, and the generator's state advances as in eager steps.

If the capture itself fails -- an error, an empty graph (work issued to another device's
streams), a parameter left without a gradient -- training warns once and goes on eagerly.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable

import torch

from .models import State, detach_state

WARMUP_STEPS = 3  # eager steps on the capture stream before the capture (PyTorch's docs use 3)


def graph_blocker(device: torch.device, precision: str, distributed: bool, compiled: bool, adaptive: bool,
                  plain_loss: bool = True, variable_bptt: bool = False) -> str:
    """Why a training step cannot be captured as a CUDA graph here ('' = it can). `plain_loss`: the
    output layer is PyTorch's linear + cross-entropy (models.PLAIN_LOSS_MAX), not the fused function,
    whose rare-row fix-up reads the device on the host."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {device.type})"
    if precision == "fp16":
        return "fp16 training's GradScaler reads an overflow flag on the host at every step"
    if distributed:
        return "under torchrun, DistributedDataParallel's gradient hooks run outside a graph"
    if compiled:
        return "train.compile=true (torch.compile manages its own graphs)"
    if adaptive:
        return "an adaptive softmax chooses its clusters on the host from each window's targets"
    if variable_bptt:
        return "train.variable_bptt=true: the windows' lengths vary, and a graph replays one shape"
    if not plain_loss:
        return ("a window has too many logits for PyTorch's cross-entropy (bptt x batch_size x vocabulary >= 2^25), "
                "and the fused loss used instead reads the device on the host")
    return ""


def _flat(state: State) -> list[torch.Tensor]:
    if state is None:
        return []
    return list(state) if isinstance(state, tuple) else [state]


def _shaped(flat: list[torch.Tensor], like: State) -> State:
    if isinstance(like, tuple):
        return tuple(flat)
    return flat[0] if flat else None


class GraphedStep:
    """One training step (forward, loss, backward, clipping) replayed from a CUDA graph.

    ``step(xy, state, xyb, state_b) -> (loss, grad_norm, state, state_b)`` takes a window as its
    (T + 1, B) token block (inputs ``xy[:-1]``, targets ``xy[1:]``; `xyb` for a bidirectional
    model's backward stack) and the carried state (None = zeros), and leaves the clipped
    gradients in the parameters' ``.grad`` for the optimizer. Gradients are never set to None
    once captured: the graph writes into those buffers (eager steps zero them in place).
    """

    def __init__(self, step_module: torch.nn.Module, params: list[torch.nn.Parameter], clip: float,
                 autocast: Callable, window: int | None = None, warmup: int = WARMUP_STEPS,
                 warn: Callable[[str], None] | None = None):
        self.step_module, self.params, self.clip, self.autocast = step_module, params, clip, autocast
        self.window = window  # the full window length (train.bptt): the shape worth capturing
        self.warmup = warmup
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
        # Streams, synchronisation and the capture all belong to the parameters' GPU, which need not
        # be the current device (train.device=cuda:1 in a single process).
        self.device = params[0].device
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = ""        # why the capture failed ('' = it did not)
        self.warm = 0           # eager steps taken before the capture
        self.replays = 0
        self.key = None         # the shapes the graph was captured with
        self.like = (None, None)  # the last state structures seen (for zeros at an epoch's start)

    # -- the step ---------------------------------------------------------------------------
    def step(self, xy: torch.Tensor, state: State, xyb: torch.Tensor | None = None, state_b: State = None):
        with torch.cuda.device(self.device):
            return self._step(xy, state, xyb, state_b)

    def _step(self, xy, state, xyb, state_b):
        key = (tuple(xy.shape), None if xyb is None else tuple(xyb.shape))
        if self.graph is None and not self.failed and self.warm >= self.warmup and \
                (self.window is None or xy.size(0) == self.window + 1) and self._shapes_known(state, xyb, state_b):
            self._capture(xy, state, xyb, state_b)
        if self.graph is not None and key == self.key:
            return self._replay(xy, state, xyb, state_b)
        out = self._eager(xy, state, xyb, state_b)
        if self.graph is None:
            self.warm += 1
        return out

    def _shapes_known(self, state: State, xyb, state_b: State) -> bool:
        """A capture needs the carried state's shapes: this step's state, or a warm-up step's."""
        return (state is not None or self.like[0] is not None) and \
            (xyb is None or state_b is not None or self.like[1] is not None)

    def _forward_backward(self, xy, state, xyb, state_b):
        x, y = xy[:-1], xy[1:]
        xb = yb = None
        if xyb is not None:
            xb, yb = xyb[:-1], xyb[1:]
        with self.autocast():
            obj, loss, state, state_b = self.step_module(x, y, state, xb, yb, state_b)
        obj.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        return loss.detach(), gnorm, detach_state(state), detach_state(state_b)

    def _eager(self, xy, state, xyb, state_b):
        if self.graph is None:
            for p in self.params:
                p.grad = None
        else:  # the graph's gradient buffers stay in place
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        side = self.graph is None  # warm-up: on the stream the capture will use
        if side:
            self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream) if side else nullcontext():
            out = self._forward_backward(xy.long(), state, None if xyb is None else xyb.long(), state_b)
        if side:
            torch.cuda.current_stream().wait_stream(self.stream)
        self.like = (out[2] if out[2] is not None else self.like[0], out[3] if out[3] is not None else self.like[1])
        return out

    # -- capture and replay -----------------------------------------------------------------
    def _static_state(self, state: State, like: State) -> State:
        if state is not None:
            return _shaped([t.detach().clone() for t in _flat(state)], state)
        if like is None:
            return None
        return _shaped([torch.zeros_like(t) for t in _flat(like)], like)

    def _capture(self, xy, state, xyb, state_b) -> None:
        self.s_xy = xy.long().clone()
        self.s_xyb = None if xyb is None else xyb.long().clone()
        self.s_state = self._static_state(state, self.like[0])
        self.s_state_b = self._static_state(state_b, self.like[1]) if xyb is not None else None
        for p in self.params:  # the capture allocates the gradient buffers the replays write into
            p.grad = None
        graph = torch.cuda.CUDAGraph()

        def body() -> None:
            loss, gnorm, st, stb = self._forward_backward(self.s_xy, self.s_state, self.s_xyb, self.s_state_b)
            self.s_stats = torch.stack([loss.float(), gnorm.float()])
            # The new state goes into the input buffers, after the backward pass that read them.
            for dst, src in zip(_flat(self.s_state) + _flat(self.s_state_b), _flat(st) + _flat(stb)):
                dst.copy_(src)

        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                record(graph, self.stream, body)
            empty = [w for w in said if "empty" in str(w.message).lower() and "graph" in str(w.message).lower()]
            for w in said:
                if w not in empty:  # not ours to hide
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if empty:  # the work ran on another device's streams: nothing was recorded
                raise RuntimeError(str(empty[0].message))
            missing = [i for i, p in enumerate(self.params) if p.grad is None]
            if missing:  # a replay would leave a stale gradient there for the optimizer
                raise RuntimeError(f"{len(missing)} parameter(s) got no gradient in the captured step")
        except Exception as e:  # noqa: BLE001 - any failure to capture leaves training eager
            for p in self.params:
                p.grad = None
            self.failed = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            self.warn(f"the training step could not be captured as a CUDA graph ({self.failed}); training goes on "
                      f"without graphs (train.cuda_graphs=false skips the attempt)")
            return
        self.graph = graph
        self.key = (tuple(xy.shape), None if xyb is None else tuple(xyb.shape))

    def _replay(self, xy, state, xyb, state_b):
        self.s_xy.copy_(xy)
        _load(self.s_state, state)
        if xyb is not None:
            self.s_xyb.copy_(xyb)
            _load(self.s_state_b, state_b)
        self.graph.replay()
        self.replays += 1
        stats = self.s_stats.clone()  # the buffer is overwritten by the next replay
        return stats[0], stats[1], self.s_state, self.s_state_b


def record(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, body: Callable[[], None]) -> None:
    """Capture what `body` launches into `graph` (tests replace this to simulate a graph on CPU)."""
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, stream=stream):
        body()


def _load(static: State, state: State) -> None:
    """Put `state` into the graph's input buffers (None: zeros; the buffers themselves: nothing to do)."""
    for dst, src in zip(_flat(static), _flat(state) or [None] * len(_flat(static))):
        if src is None:
            dst.zero_()
        elif src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
