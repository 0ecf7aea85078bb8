"""A multi-layer LSTM with peephole connections (Gers & Schmidhuber 2000).

Notation as in :mod:`rnnlm.models`: x⟨t⟩ the layer input at step t, a⟨t⟩ the hidden
state, c⟨t⟩ the memory cell, c̃⟨t⟩ the candidate cell, Γi / Γf / Γo the input (update),
forget and output gates, σ the logistic function, ⊙ the elementwise product. Each layer
computes, for t = 1..T::

    Γi⟨t⟩ = σ(W_i x⟨t⟩ + U_i a⟨t−1⟩ + p_i ⊙ c⟨t−1⟩ + b_i)
    Γf⟨t⟩ = σ(W_f x⟨t⟩ + U_f a⟨t−1⟩ + p_f ⊙ c⟨t−1⟩ + b_f)
    c̃⟨t⟩  = tanh(W_g x⟨t⟩ + U_g a⟨t−1⟩ + b_g)
    c⟨t⟩  = Γf⟨t⟩ ⊙ c⟨t−1⟩ + Γi⟨t⟩ ⊙ c̃⟨t⟩
    Γo⟨t⟩ = σ(W_o x⟨t⟩ + U_o a⟨t−1⟩ + p_o ⊙ c⟨t⟩ + b_o)      (the *new* cell)
    a⟨t⟩  = Γo⟨t⟩ ⊙ tanh(c⟨t⟩)

The peephole weights p_i, p_f, p_o are diagonal (vectors of size H). With p = 0 this is
exactly ``torch.nn.LSTM``; the parameters are laid out like nn.LSTM's (W = ``weight_ih``,
U = ``weight_hh``, b = ``bias_ih + bias_hh``, rows in gate order i, f, g, o), so an
nn.LSTM state dict loads with ``strict=False`` (only the peephole weights are missing).

Implementation: per layer, the input projection of all T steps is one matmul; the time
loop then does only the recurrent matmul and the gate arithmetic. The loop is one
``torch.autograd.Function`` with a hand-written backward (BPTT), so autograd sees a
single node per layer instead of ~15 per time step; the gates' local derivatives, the
peephole and W_hh gradients are computed for all steps at once, outside the loop. In fp32 on
CPU the per-step recurrent products (a⟨t−1⟩ U^T forward, dz U backward) go to oneDNN with U
packed once per layer call (:func:`rnnlm.ops.step_matmul`, checked at start-up, falling back to
``torch.mm``). See ``docs/peephole.md`` for the alternatives measured (eager autograd,
TorchScript, torch.compile) and the numbers. Double backward is not supported: a backward pass
with ``create_graph=True`` through this module raises a RuntimeError.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import no_autocast, step_matmul

__all__ = ["PeepholeLSTM"]


class _PeepholeLayer(torch.autograd.Function):
    """One peephole-LSTM layer over a whole sequence, given its input projection.

    Inputs (all of one dtype and device):
      xp (T, B, 4H)  W x⟨t⟩ + b for every step, gate blocks i, f, g, o
      h0, c0 (B, H)  a⟨0⟩, c⟨0⟩
      w_hh (4H, H)   U
      p_i, p_f, p_o (H,)
    Outputs: a⟨1..T⟩ (T, B, H), a⟨T⟩ (B, H), c⟨T⟩ (B, H).
    """

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, p_i, p_f, p_o):
        T, B, H4 = xp.shape
        H = H4 // 4
        # Autocast is off in here: the caller has already cast everything to one dtype,
        # so the math is the same with and without autocast (see PeepholeLSTM.forward).
        with no_autocast(xp.device.type):
            gates = torch.empty_like(xp)                 # activated Γi, Γf, c̃, Γo
            cs = xp.new_empty(T + 1, B, H)               # c⟨0..T⟩
            tcs = xp.new_empty(T, B, H)                  # tanh(c⟨1..T⟩)
            out = xp.new_empty(T, B, H)                  # a⟨1..T⟩
            cs[0] = c0
            u_t = w_hh.t()
            h_u = step_matmul(w_hh, B, T)                # fp32 on CPU: h -> h @ U^T by oneDNN, U packed once
            p_if = torch.stack((p_i, p_f))               # (2, H)
            # Per-step views, made once (slicing in the loop costs more than the math at
            # small sizes): gate blocks of step t, cell states, outputs.
            gv = gates.view(T, B, 4, H)
            xs, zs, outs, tcs_l = xp.unbind(0), gates.unbind(0), out.unbind(0), tcs.unbind(0)
            zif = gv[:, :, :2].unbind(0)                 # (B, 2, H): Γi and Γf together
            gis, gfs, ggs, gos = (gv[:, :, j].unbind(0) for j in range(4))
            cs_l, cs_u = cs.unbind(0), cs.unsqueeze(2).unbind(0)
            h = h0
            for t in range(T):
                if h_u is None:
                    torch.addmm(xs[t], h, u_t, out=zs[t])              # W x + b + U a⟨t−1⟩
                else:
                    torch.add(xs[t], h_u(h), out=zs[t])
                zif[t].addcmul_(p_if, cs_u[t]).sigmoid_()              # Γi, Γf see c⟨t−1⟩
                ggs[t].tanh_()                                         # c̃⟨t⟩
                torch.mul(gfs[t], cs_l[t], out=cs_l[t + 1]).addcmul_(gis[t], ggs[t])  # c⟨t⟩
                gos[t].addcmul_(p_o, cs_l[t + 1]).sigmoid_()           # Γo sees c⟨t⟩
                torch.tanh(cs_l[t + 1], out=tcs_l[t])
                h = torch.mul(gos[t], tcs_l[t], out=outs[t])           # a⟨t⟩
        ctx.save_for_backward(gates, cs, tcs, out, h0, w_hh, p_i, p_f, p_o)
        return out, out[T - 1].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        if torch.is_grad_enabled():
            # Grad mode is on in here exactly when the caller asked for create_graph=True.
            # The saved activations are not part of any graph, so a second derivative
            # through this backward would be silently wrong: refuse instead.
            raise RuntimeError("PeepholeLSTM does not support double backward (create_graph=True)")
        gates, cs, tcs, out, h0, w_hh, p_i, p_f, p_o = ctx.saved_tensors
        T, B, H4 = gates.shape
        H = H4 // 4
        with no_autocast(gates.device.type):
            gi, gf, gg, go = gates.view(T, B, 4, H).unbind(2)
            c_prev = cs[:-1]
            # Local derivatives for all steps at once:
            #   dzo = dh ⊙ tanh(c) ⊙ Γo(1−Γo)              -> a_o
            #   dc += dh ⊙ Γo (1 − tanh²c) + dzo ⊙ p_o      -> b_c
            #   dzi, dzf, dzg = dc ⊙ (c̃ Γi(1−Γi), c⟨t−1⟩ Γf(1−Γf), Γi (1−c̃²))  -> pq
            a_o = tcs * go * (1 - go)
            b_c = go * (1 - tcs * tcs)
            pq = torch.stack((gg * gi * (1 - gi), c_prev * gf * (1 - gf), gi * (1 - gg * gg)), 2)
            dz_all = torch.empty_like(gates).view(T, B, 4, H)
            dh = d_hn + d_out[T - 1]
            dc = d_cn.clone()
            dzs = dz_all.view(T, B, H4).unbind(0)
            dz3s = dz_all[:, :, :3].unbind(0)            # (B, 3, H): dzi, dzf, dzg
            dzis, dzfs, dzos = (dz_all[:, :, j].unbind(0) for j in (0, 1, 3))
            a_l, b_l, pq_l, gf_l = a_o.unbind(0), b_c.unbind(0), pq.unbind(0), gf.unbind(0)
            do_l = d_out.unbind(0)
            dz_u = step_matmul(w_hh.t(), B, T)           # fp32 on CPU: dz -> dz @ U by oneDNN
            for t in range(T - 1, -1, -1):
                dzo = torch.mul(dh, a_l[t], out=dzos[t])
                dc.addcmul_(dh, b_l[t]).addcmul_(dzo, p_o)
                torch.mul(dc.unsqueeze(1), pq_l[t], out=dz3s[t])
                dc = (dc * gf_l[t]).addcmul_(dzis[t], p_i).addcmul_(dzfs[t], p_f)
                if dz_u is None:
                    dh = torch.addmm(do_l[t - 1], dzs[t], w_hh) if t > 0 else torch.mm(dzs[t], w_hh)
                else:
                    dh = dz_u(dzs[t])
                    if t > 0:
                        dh.add_(do_l[t - 1])
            dz_flat = dz_all.view(T * B, 4, H)
            d_w_hh = d_pi = d_pf = d_po = None
            if ctx.needs_input_grad[3]:
                h_prev = torch.cat((h0.unsqueeze(0), out[:-1])).view(T * B, H)
                d_w_hh = torch.mm(dz_all.view(T * B, H4).t(), h_prev)
            if any(ctx.needs_input_grad[4:]):
                cp = c_prev.reshape(T * B, H)
                d_pi = (dz_flat[:, 0] * cp).sum(0)
                d_pf = (dz_flat[:, 1] * cp).sum(0)
                d_po = (dz_flat[:, 3] * cs[1:].reshape(T * B, H)).sum(0)
        return dz_all.view(T, B, H4), dh, dc, d_w_hh, d_pi, d_pf, d_po


class PeepholeLSTM(nn.Module):
    """Multi-layer peephole LSTM, a drop-in for ``nn.LSTM`` (sequence-first only).

    Args:
      input_size: features of x (I).
      hidden_size: features of a⟨t⟩ and c⟨t⟩ (H).
      num_layers: stacked layers; layer k > 0 reads layer k−1's outputs.
      dropout: dropout probability on the outputs of every layer but the last, in
        training mode only (as nn.LSTM).
      bias: whether to have ``bias_ih_l{k}`` / ``bias_hh_l{k}``.

    Attributes ``inter_drop`` and ``weight_drop`` (None by default) take modules that replace the
    dropout between layers and mask each ``weight_hh_l{k}`` in training (DropConnect).

    Parameters of layer k, named as in nn.LSTM (gate row blocks i, f, g, o):
      ``weight_ih_l{k}`` (4H, I or H), ``weight_hh_l{k}`` (4H, H),
      ``bias_ih_l{k}``, ``bias_hh_l{k}`` (4H), and the peephole diagonals
      ``weight_ci_l{k}`` (p_i), ``weight_cf_l{k}`` (p_f), ``weight_co_l{k}`` (p_o), each (H,).
    All of them, peepholes included, start U(−1/√H, 1/√H) like nn.LSTM's weights.

    ``forward(x, state=None)``: x (T, B, I); state None (zeros) or (h0, c0), each
    (num_layers, B, H). Returns ``output`` (T, B, H) -- the last layer's a⟨t⟩ -- and
    ``(h_n, c_n)``, each (num_layers, B, H).

    Under ``torch.autocast`` the input projection runs in the autocast dtype (it is a
    matmul), and the rest of the layer -- recurrent matmul, gate math, cell state --
    runs in that same dtype (h0, c0, W_hh and the peepholes are cast to it), so the
    outputs and states come back in the autocast dtype, as with nn.LSTM.

    >>> m = PeepholeLSTM(8, 16, num_layers=2)
    >>> out, (h, c) = m(torch.zeros(5, 3, 8))
    >>> out.shape, h.shape, c.shape
    (torch.Size([5, 3, 16]), torch.Size([2, 3, 16]), torch.Size([2, 3, 16]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if not (isinstance(input_size, int) and input_size > 0):
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if not (isinstance(hidden_size, int) and hidden_size > 0):
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not (isinstance(num_layers, int) and num_layers > 0):
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout acts only between layers, so it has no effect with num_layers=1 "
                          f"(got dropout={dropout})", stacklevel=2)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.bias = bias
        # Set by the language model for its regularisers (training only): a module applied between
        # layers in place of F.dropout (e.g. locked dropout), and one applied to each weight_hh_l{k}
        # per call (DropConnect, AWD-LSTM's weight drop).
        self.inter_drop: nn.Module | None = None
        self.weight_drop: nn.Module | None = None
        H = hidden_size
        for k in range(num_layers):
            n_in = input_size if k == 0 else H
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H)))
            if bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * H)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * H)))
            for gate in "ifo":
                self.register_parameter(f"weight_c{gate}_l{k}", nn.Parameter(torch.empty(H)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter ~ U(−1/√H, 1/√H), as nn.LSTM (the peepholes too)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written against nn.LSTM (there is no cuDNN weight buffer)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if not self.bias:
            s += ", bias=False"
        return s

    def _layer_params(self, k: int):
        g = lambda name: getattr(self, f"{name}_l{k}")  # noqa: E731
        b = g("bias_ih") + g("bias_hh") if self.bias else None
        return g("weight_ih"), g("weight_hh"), b, g("weight_ci"), g("weight_cf"), g("weight_co")

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        if x.dim() != 3:
            raise ValueError(f"PeepholeLSTM expects input (T, B, {self.input_size}), got shape {tuple(x.shape)}")
        T, B, n_in = x.shape
        if n_in != self.input_size:
            raise ValueError(f"input has {n_in} features, expected input_size={self.input_size}")
        if T == 0:
            raise ValueError("expected a sequence length T > 0")
        L, H = self.num_layers, self.hidden_size
        if state is not None:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise ValueError("state must be None or a tuple (h0, c0)")
            for name, s in zip(("h0", "c0"), state):
                if tuple(s.shape) != (L, B, H):
                    raise ValueError(f"{name} must have shape {(L, B, H)}, got {tuple(s.shape)}")
        inp = x
        h_n, c_n = [], []
        for k in range(L):
            w_ih, w_hh, b, p_i, p_f, p_o = self._layer_params(k)
            n_k = inp.shape[2]
            xp = F.linear(inp.reshape(T * B, n_k), w_ih, b).view(T, B, 4 * H)
            dt = xp.dtype  # the autocast dtype under autocast, else the parameters' dtype
            if state is None:
                h0 = xp.new_zeros(B, H)
                c0 = xp.new_zeros(B, H)
            else:
                h0, c0 = state[0][k].to(dt), state[1][k].to(dt)
            if self.weight_drop is not None and self.training:
                w_hh = self.weight_drop(w_hh)  # DropConnect on the recurrent weights, one mask per call
            out, h, c = _PeepholeLayer.apply(xp, h0, c0, w_hh.to(dt), p_i.to(dt), p_f.to(dt), p_o.to(dt))
            h_n.append(h)
            c_n.append(c)
            if k < L - 1 and self.training:
                if self.inter_drop is not None:
                    out = self.inter_drop(out)
                elif self.dropout > 0:
                    out = F.dropout(out, self.dropout, training=True)
            inp = out
        return inp, (torch.stack(h_n), torch.stack(c_n))
