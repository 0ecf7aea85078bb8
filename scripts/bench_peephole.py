#!/usr/bin/env python
"""Time forward+backward of rnnlm.peephole.PeepholeLSTM against nn.LSTM of the same sizes.

    python scripts/bench_peephole.py --T 35 --B 20 --H 200 --layers 2
    python scripts/bench_peephole.py --H 512 --bf16          # also under CPU/CUDA autocast bf16
    python scripts/bench_peephole.py --variants [--compile]  # also the implementations not chosen

One iteration = forward of a (T, B, H) batch with a carried (h0, c0) state, a scalar loss
over output, h_n and c_n, and backward into the input and all parameters. Each timing is
the median (and the best) over --repeats rounds of the mean over --steps iterations, after
--warmup iterations; the rounds interleave the models, so background load skews the ratios
less (on a shared machine, "best" is the steadier number).
--variants also times the designs measured while choosing PeepholeLSTM's implementation,
each computing the same peephole LSTM (checked against PeepholeLSTM before timing):
  eager      the time loop written with plain autograd ops
  jit-loop   the whole time loop of a layer as one torch.jit.script function
  jit-step   a torch.jit.script function for the gate math of one step
  compile    torch.compile of the eager version (only with --compile; compiles for minutes)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rnnlm.peephole import PeepholeLSTM  # noqa: E402


# -- the alternative implementations (for --variants) ---------------------------------------

def loop_eager(xp: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, p_i: Tensor, p_f: Tensor,
               p_o: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    outs: List[Tensor] = []
    u_t = w_hh.t()
    for t in range(xp.shape[0]):
        z = torch.addmm(xp[t], h, u_t)
        zi, zf, zg, zo = z.chunk(4, 1)
        i = torch.sigmoid(zi + p_i * c)
        f = torch.sigmoid(zf + p_f * c)
        c = f * c + i * torch.tanh(zg)
        o = torch.sigmoid(zo + p_o * c)
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def step_math(z: Tensor, c: Tensor, p_i: Tensor, p_f: Tensor, p_o: Tensor) -> Tuple[Tensor, Tensor]:
    zi, zf, zg, zo = z.chunk(4, 1)
    i = torch.sigmoid(zi + p_i * c)
    f = torch.sigmoid(zf + p_f * c)
    c = f * c + i * torch.tanh(zg)
    o = torch.sigmoid(zo + p_o * c)
    return o * torch.tanh(c), c


def make_loop_jit_step():
    step = torch.jit.script(step_math)

    def loop(xp, h, c, w_hh, p_i, p_f, p_o):
        outs = []
        u_t = w_hh.t()
        for t in range(xp.shape[0]):
            h, c = step(torch.addmm(xp[t], h, u_t), c, p_i, p_f, p_o)
            outs.append(h)
        return torch.stack(outs), h, c
    return loop


class AltPeephole(nn.Module):
    """PeepholeLSTM's parameters and forward, with another time loop per layer."""

    def __init__(self, base: PeepholeLSTM, loop) -> None:
        super().__init__()
        self.base, self.loop = base, loop

    def forward(self, x, state):
        m = self.base
        T, B, _ = x.shape
        inp, hs, cs = x, [], []
        for k in range(m.num_layers):
            w_ih, w_hh, b, p_i, p_f, p_o = m._layer_params(k)
            xp = F.linear(inp.reshape(T * B, -1), w_ih, b).view(T, B, -1)
            dt = xp.dtype
            out, h, c = self.loop(xp, state[0][k].to(dt), state[1][k].to(dt), w_hh.to(dt),
                                  p_i.to(dt), p_f.to(dt), p_o.to(dt))
            hs.append(h)
            cs.append(c)
            inp = out
        return inp, (torch.stack(hs), torch.stack(cs))


# -- timing ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_models(models, x, state, args, device) -> list[tuple[float, float]]:
    """(median, best) over rounds of the mean ms per forward+backward iteration over
    --steps iterations, for each model. The rounds interleave the models, so that a change
    in the machine's load hits all of them alike and the ratios stay fair."""
    def one(model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out, (h, c) = model(x, state)
            loss = out.float().sum() + h.float().sum() + c.float().sum()
        loss.backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _, model in models:
        for _ in range(args.warmup):
            one(model)
    rounds = [[] for _ in models]
    for _ in range(args.repeats):
        for j, (_, model) in enumerate(models):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one(model)
            sync()
            rounds[j].append((time.perf_counter() - t0) / args.steps * 1000)
    return [(statistics.median(r), min(r)) for r in rounds]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=35, help="sequence length")
    ap.add_argument("--B", type=int, default=20, help="batch size")
    ap.add_argument("--H", type=int, default=200, help="hidden size (= input size)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="iterations per timing round")
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (the median is reported)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="also time under autocast bfloat16")
    ap.add_argument("--variants", action="store_true", help="also time the alternative implementations")
    ap.add_argument("--compile", action="store_true", help="with --variants: also torch.compile (slow)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    T, B, H, L = args.T, args.B, args.H, args.layers

    ref = nn.LSTM(H, H, L).to(device)
    pee = PeepholeLSTM(H, H, L).to(device)
    x = torch.randn(T, B, H, device=device, requires_grad=True)
    state = (torch.randn(L, B, H, device=device), torch.randn(L, B, H, device=device))

    models = [("nn.LSTM", ref), ("PeepholeLSTM", pee)]
    if args.variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
            alts = [("eager autograd", AltPeephole(pee, loop_eager)),
                    ("jit.script loop", AltPeephole(pee, torch.jit.script(loop_eager))),
                    ("jit.script step", AltPeephole(pee, make_loop_jit_step()))]
        if args.compile:
            alts.append(("torch.compile", torch.compile(AltPeephole(pee, loop_eager))))
        with torch.no_grad():
            want, _ = pee(x, state)
        for name, m in alts:
            t0 = time.perf_counter()
            with torch.no_grad():
                got, _ = m(x, state)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
            if name == "torch.compile":
                # the first call above compiled only the forward; one step compiles the backward
                out, (h, c) = m(x, state)
                (out.sum() + h.sum() + c.sum()).backward()
                print(f"# torch.compile: first forward+backward {time.perf_counter() - t0:.1f} s")
        models += alts

    precisions = ["fp32"] + (["bf16"] if args.bf16 else [])
    print(f"# {datetime.date.today().isoformat()}  torch {torch.__version__}  "
          f"{cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}  "
          f"threads={torch.get_num_threads()}")
    print(f"# T={T} B={B} H={H} layers={L}  forward+backward, median of {args.repeats} x {args.steps} iterations")
    print("# ms/iter and tokens/s: median over rounds; best: fastest round; ratio: to nn.LSTM's")
    print(f"{'model':<18} {'precision':<9} {'ms/iter':>9} {'best':>8} {'tokens/s':>10} {'ratio':>6} {'ratio(best)':>11}")
    for prec in precisions:
        args.bf16 = prec == "bf16"
        times = time_models(models, x, state, args, device)
        (ref_med, ref_best) = times[0]
        for (name, _), (med, best) in zip(models, times):
            print(f"{name:<18} {prec:<9} {med:9.2f} {best:8.2f} {T * B / med * 1000:10.0f} "
                  f"{med / ref_med:6.2f} {best / ref_best:11.2f}", flush=True)


if __name__ == "__main__":
    main()
