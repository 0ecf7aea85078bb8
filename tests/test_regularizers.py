"""AWD-LSTM's regularisers (Merity, Keskar & Socher 2018): locked (variational) dropout, embedding
dropout, DropConnect on the recurrent weights, per-site dropout rates, and the AR / TAR penalties."""

from __future__ import annotations

import pytest
import torch

from rnnlm.config import ModelConfig, build_config
from rnnlm.errors import UsageError
from rnnlm.models import RNNLM, Dropout, make_rnn, run_layerwise
from rnnlm.train import Trainer, _StepModule

V = 31


def _model(**kw) -> RNNLM:
    torch.manual_seed(0)
    args = dict(embedding_size=8, hidden_size=12, num_layers=2)
    args.update(kw)
    return RNNLM(V, ModelConfig(**args))


# -- locked dropout ----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_locked_dropout_shares_one_mask_across_time(p):
    d = Dropout(p, locked=True)
    torch.manual_seed(1)
    y = d(torch.ones(30, 16, 50))
    assert all(torch.equal(y[t], y[0]) for t in range(30))     # the same mask at every step
    dropped = (y[0] == 0).double().mean().item()
    assert abs(dropped - p) < 0.06                              # 800 draws: ~4 sd
    kept = y[0][y[0] != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - d.rate)))
    d.eval()
    x = torch.randn(3, 2, 4)
    assert d(x) is x


def test_unlocked_dropout_draws_each_step_anew():
    torch.manual_seed(1)
    y = Dropout(0.5)(torch.ones(30, 16, 50))
    assert not torch.equal(y[1], y[0])


def test_locked_dropout_off_cpu_uses_pytorchs_dropout_for_the_mask(monkeypatch):
    import rnnlm.models as M
    monkeypatch.setattr(M, "_sliced_draws", lambda device: False)
    torch.manual_seed(4)
    y = M.Dropout(0.3, locked=True)(torch.ones(5, 400, 100))
    assert all(torch.equal(y[t], y[0]) for t in range(5))
    assert abs((y[0] == 0).double().mean().item() - 0.3) < 0.01


# -- per-site rates --------------------------------------------------------------------------------
def test_site_rates_default_to_model_dropout_and_override_it():
    m = _model(dropout=0.3)
    assert (m.drop_in.p, m.drop_hid.p, m.drop_out.p) == (0.3, 0.3, 0.3)
    m = _model(dropout=0.3, dropout_input=0.65, dropout_hidden=0.0, dropout_output=0.4, locked_dropout=True)
    assert (m.drop_in.p, m.drop_hid.p, m.drop_out.p) == (0.65, 0.0, 0.4)
    assert m.drop_in.locked and m.drop_hid.locked and m.drop_out.locked
    assert m.rnns[0].dropout == 0.0                             # the module's own rate follows the hidden site


def test_only_the_input_site_drops_when_it_alone_is_set():
    """dropout_input=1 zeroes the first layer's input: the model's features are those of zero embeddings."""
    m = _model(dropout_input=1.0)
    x = torch.randint(0, V, (6, 3))
    m.train()
    h, _ = m(x)
    with torch.no_grad():
        m.embedding.weight.zero_()
    m.eval()
    h0, _ = m(x)
    assert torch.allclose(h, h0, atol=1e-6)


# -- embedding dropout -----------------------------------------------------------------------------
def test_embedding_dropout_drops_word_types_not_positions():
    m = _model(dropout_embedding=0.5)
    m.train()
    x = torch.randint(0, 6, (40, 8))                            # 6 types, each seen many times
    torch.manual_seed(3)
    e = m.embed(x)
    full = m.embedding(x)
    for tok in range(6):
        rows = e[x == tok]
        dropped = (rows == 0).all(dim=1)
        assert dropped.all() or not dropped.any()               # all occurrences alike
        if not dropped.any():
            assert torch.allclose(rows, 2 * full[x == tok])     # kept ones scaled by 1 / (1 - 0.5)
    # over many windows, about half the types are dropped
    counts = []
    x = torch.arange(V).view(V, 1)
    for _ in range(200):
        counts.append((m.embed(x).abs().sum(-1) == 0).double().mean().item())
    assert abs(sum(counts) / len(counts) - 0.5) < 0.03
    m.eval()
    assert torch.equal(m.embed(x), m.embedding(x))


def test_embedding_dropout_leaves_the_tied_output_layer_alone():
    """With tied weights only the lookup is masked; the softmax scores every word with its full row."""
    m = _model(dropout_embedding=1.0, tie_weights=True, hidden_size=8)
    m.train()
    x = torch.randint(0, V, (5, 2))
    assert m.embed(x).abs().sum() == 0
    h = torch.randn(5, 2, 8)
    assert torch.allclose(m.logits(h), h @ m.embedding.weight.T + m.decoder.bias, atol=1e-5)


# -- weight drop (DropConnect) ------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_weight_drop_is_the_stack_run_on_masked_recurrent_weights(cell):
    torch.manual_seed(0)
    rnn = make_rnn(cell, 6, 5, 2, 0.0)
    x = torch.randn(7, 4, 6)
    wd = Dropout(0.4)
    torch.manual_seed(9)
    got, _ = run_layerwise(rnn, x, None, Dropout(0.0), wd)
    got.sum().backward()
    # the same masks, drawn in the same order, applied by hand to a copy of the stack
    torch.manual_seed(9)
    masks = [wd.mask(getattr(rnn, f"weight_hh_l{k}").shape, x) for k in range(2)]
    ref = make_rnn(cell, 6, 5, 2, 0.0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            src = getattr(rnn, name)
            p.copy_(src * masks[int(name[-1])] if name.startswith("weight_hh") else src)
    want, _ = ref(x)
    assert torch.allclose(got, want, atol=1e-6)
    want.sum().backward()
    for k in range(2):   # the parameter's gradient: the masked copy's, through the same mask
        g, g_ref = getattr(rnn, f"weight_hh_l{k}").grad, getattr(ref, f"weight_hh_l{k}").grad
        assert torch.allclose(g, g_ref * masks[k], atol=1e-6)
        assert (g[masks[k] == 0] == 0).all() and (g[masks[k] != 0] != 0).any()


@pytest.mark.parametrize("cell", ["lstm", "lstm_peephole", "gru", "rnn_relu"])
@pytest.mark.parametrize("layers", [1, 2])
def test_full_weight_drop_cuts_the_recurrence(cell, layers):
    """weight_drop=1 zeroes every W_hh in training: each step then sees only its input (and, for an
    LSTM, its own cell), as a model whose recurrent weights are zero does; eval keeps them."""
    m = _model(cell=cell, num_layers=layers, weight_drop=1.0)
    x = torch.randint(0, V, (6, 3))
    m.train()
    h, _ = m(x)
    ref = _model(cell=cell, num_layers=layers)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "weight_hh" in name:
                p.zero_()
    ref.eval()
    assert torch.allclose(h, ref(x)[0], atol=1e-5)
    m.eval()
    assert not torch.allclose(m(x)[0], ref(x)[0], atol=1e-3)


def test_weight_drop_leaves_the_parameters_untouched():
    m = _model(weight_drop=0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    m(torch.randint(0, V, (4, 2)))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# -- AR / TAR -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True])
def test_ar_and_tar_add_their_known_penalties_and_the_logged_loss_is_the_cross_entropy(bidirectional):
    m = _model(bidirectional=bidirectional, hidden_size=8, embedding_size=8, head_layers=1)
    m.train()   # no dropout configured: a deterministic forward
    x, y = torch.randint(0, V, (9, 3)), torch.randint(0, V, (9, 3))
    xb, yb = (x.flip(0), y.flip(0)) if bidirectional else (None, None)
    plain_obj, plain_loss, _, _ = _StepModule(m)(x, y, None, xb, yb, None)
    assert plain_obj is plain_loss
    obj, loss, _, _ = _StepModule(m, ar=2.0, tar=1.0)(x, y, None, xb, yb, None)
    assert torch.allclose(loss, plain_loss)

    def penalty(ids, d):
        h, raw, _ = m.features(ids, None, d)
        assert not torch.allclose(h, raw)            # the head sits between them
        return 2.0 * h.pow(2).mean() + 1.0 * (raw[1:] - raw[:-1]).pow(2).mean()
    want = penalty(x, 0) if not bidirectional else 0.5 * (penalty(x, 0) + penalty(xb, 1))
    assert torch.allclose(obj - loss, want, rtol=1e-5)
    assert want > 0


def test_tar_needs_two_steps():
    m = _model()
    m.train()
    x = torch.randint(0, V, (1, 3))
    obj, loss, _, _ = _StepModule(m, tar=1.0)(x, x, None)
    assert torch.equal(obj, loss)


# -- config and training ----------------------------------------------------------------------------------
def test_awd_names_are_suggested_for_unknown_keys():
    for other, ours in [("model.dropouti", "model.dropout_input"), ("model.dropouth", "model.dropout_hidden"),
                        ("model.dropoute", "model.dropout_embedding"), ("model.wdrop", "model.weight_drop")]:
        with pytest.raises(UsageError, match=f"did you mean '{ours}'"):
            build_config(None, [f"{other}=0.1"])
        with pytest.raises(UsageError, match=f"did you mean '{ours}'"):
            build_config(None, [f"{other.split('.')[1]}=0.1"])   # typed bare
    for bad in ["model.weight_drop=1.5", "model.dropout_input=-0.1", "train.ar=-1", "model.locked_dropout=3"]:
        with pytest.raises(UsageError, match=bad.split("=")[0]):
            build_config(None, [bad])


AWD = ("model.dropout=0.3", "model.dropout_input=0.4", "model.dropout_embedding=0.1", "model.locked_dropout=true",
       "model.weight_drop=0.3", "train.ar=2", "train.tar=1")


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_with_every_regulariser_resumes_exactly(word_corpus, tmp_path, opt):
    """All of AWD-LSTM's regularisers at once, through the trainer (layer-by-layer stack, fused SGD or
    Adam): the loss falls, and a run interrupted and resumed ends bit-identical (the masks come
    from the checkpointed random state)."""
    from test_train import _check_exact_resume, _events
    lr = "train.lr=2" if opt == "sgd" else "train.lr=0.01"
    full = _check_exact_resume(word_corpus, tmp_path, *AWD, f"train.optimizer={opt}", lr)
    losses = [e["loss"] for e in _events(tmp_path / "full", "train")]
    assert losses[-1] < losses[0]
    cfg = full.cfg.model
    assert (cfg.weight_drop, cfg.locked_dropout, full.cfg.train.ar) == (0.3, True, 2.0)


def test_regularised_checkpoint_loads_and_evaluates_without_dropout(word_corpus, tmp_path):
    from rnnlm.checkpoint import load_model
    from test_train import _cfg
    Trainer(_cfg(word_corpus, "train.max_steps=12", *AWD), tmp_path / "r", progress=False).fit()
    model = load_model(tmp_path / "r").model
    assert not model.training
    x = torch.randint(0, model.vocab_size, (5, 2))
    assert torch.equal(model(x)[0], model(x)[0])            # deterministic: every regulariser is off
    assert model.drop_w.p == 0.3 and model.drop_in.locked


def test_a_config_from_before_the_regularisers_loads_with_them_off():
    from rnnlm.config import Config, config_from_dict
    d = Config().to_dict()
    for key in ("dropout_input", "dropout_hidden", "dropout_output", "dropout_embedding", "locked_dropout",
                "weight_drop"):
        del d["model"][key]
    del d["train"]["ar"], d["train"]["tar"]
    cfg = config_from_dict(d)
    m = RNNLM(V, cfg.model)
    assert (m.drop_emb.p, m.drop_w.p, m.drop_in.locked, cfg.train.ar, cfg.train.tar) == (0.0, 0.0, False, 0.0, 0.0)


# -- NT-ASGD: non-monotonically triggered weight averaging ---------------------------------------------
def _trainer(word_corpus, tmp_path, *extra):
    from test_train import _cfg
    return Trainer(_cfg(word_corpus, "train.averaging=nt", *extra), tmp_path / "r", progress=False)


def test_nt_trigger_is_awd_lstms_rule(word_corpus, tmp_path):
    """Averaging starts at the first validation loss worse than the best of those more than n back."""
    t = _trainer(word_corpus, tmp_path, "train.averaging_patience=2")
    for loss in [5.0, 4.0, 3.0, 3.5, 2.0, 2.5]:   # 3.5 > min(5)? 2.0 > min(5, 4)? 2.5 > min(5, 4, 3)? no
        t._maybe_start_averaging(loss)
    assert t.avg is None
    t._maybe_start_averaging(3.2)                  # > min(5, 4, 3, 3.5) = 3.0
    assert t.avg is not None and t.avg_count == 1 and t.avg_start == t.step
    assert all(torch.equal(a, p.detach()) for a, p in zip(t.avg, t.model.parameters()))


def test_averaging_evaluates_and_keeps_the_running_mean(word_corpus, tmp_path, monkeypatch):
    """Scripted validation losses trigger averaging at step 15 (3.5 > 3.0, the best before the last). From then on each validation sees the
    mean of the weights after every step since, best.pt holds it, and last.pt keeps the raw weights
    (and the mean, to resume with)."""
    from rnnlm.checkpoint import load_checkpoint
    from test_train import _events
    script = {5: 3.0, 10: 2.0, 15: 3.5, 20: 1.5, 25: 1.7, 30: 1.4}
    seen, raw = {}, {}
    orig_step = Trainer._average_step

    def evaluate(self, ids):
        seen[self.step] = [p.detach().clone() for p in self.model.parameters()]
        loss = script[self.step]
        return {"loss": loss, "ppl": 2.718281828 ** loss, "tokens": 1, "oov": 0, "bits_per_token": loss}

    def average_step(self):
        raw[self.step] = [p.detach().clone() for p in self.model.parameters()]
        orig_step(self)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "_average_step", average_step)
    t = _trainer(word_corpus, tmp_path, "train.averaging_patience=1", "train.eval_every=5", "train.max_steps=30",
                 "train.optimizer=sgd", "train.lr=1")
    end = t.fit()
    assert t.avg_start == 15 and end["averaging_from_step"] == 15
    assert sorted(raw) == list(range(16, 31))
    for step in (20, 25, 30):      # the mean of the weights after steps 15 (the trigger) .. step
        params = [seen[15]] + [raw[s] for s in range(16, step + 1)]
        want = [torch.stack(ps).mean(0) for ps in zip(*params)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen[step], want)), step
    events = _events(tmp_path / "r", "eval")
    assert [e["step"] for e in events if e.get("averaged")] == [20, 25, 30]
    names = [n for n, _ in t.model.named_parameters()]
    best = load_checkpoint(tmp_path / "r" / "best.pt")
    assert best["step"] == 30 and all(torch.equal(best["model"][n], w) for n, w in zip(names, seen[30]))
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert all(torch.equal(last["model"][n], w) for n, w in zip(names, raw[30]))
    assert not all(torch.equal(last["model"][n], w) for n, w in zip(names, seen[30]))
    av = last["trainer"]["averaging"]
    assert av["start_step"] == 15 and av["count"] == 16 and av["history"] == [3.0, 2.0, 3.5]
    assert all(torch.allclose(m, w) for m, w in zip(av["mean"], seen[30]))


def test_averaging_resumes_exactly(word_corpus, tmp_path, monkeypatch):
    """Interrupted after averaging has started and resumed: the same mean, bit for bit."""
    from rnnlm.checkpoint import load_checkpoint
    from test_train import _cfg

    def evaluate(self, ids):
        loss = {5: 3.0, 10: 2.0, 15: 3.5}.get(self.step, 1.0 + 1.0 / self.step)
        return {"loss": loss, "ppl": 2.718281828 ** loss, "tokens": 1, "oov": 0, "bits_per_token": loss}
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    common = ("train.averaging=nt", "train.averaging_patience=1", "train.eval_every=5", "model.dropout=0.2")
    Trainer(_cfg(word_corpus, "train.max_steps=40", *common), tmp_path / "full", progress=False).fit()
    Trainer(_cfg(word_corpus, "train.max_steps=20", *common), tmp_path / "part", progress=False).fit()
    Trainer(build_config(None, ["train.max_steps=40"]), tmp_path / "part", resume=True, progress=False).fit()
    a, b = (load_checkpoint(tmp_path / r / "last.pt")["trainer"]["averaging"] for r in ("full", "part"))
    assert a["start_step"] == b["start_step"] == 15 and a["count"] == b["count"] == 26
    assert all(torch.equal(x, y) for x, y in zip(a["mean"], b["mean"]))


def test_averaging_without_validations_to_trigger_it_says_so(word_corpus, tmp_path, capsys):
    from test_train import _cfg
    Trainer(_cfg(word_corpus, "train.averaging=nt", "train.eval_every=0", "train.max_steps=4"), tmp_path / "r",
            progress=False).fit()
    assert "will not be averaged" in capsys.readouterr().err


def test_a_step_gradscaler_skipped_is_not_averaged(word_corpus, tmp_path, monkeypatch):
    """fp16: GradScaler skips the update of a step with inf/NaN gradients (and lowers its scale);
    the unchanged weights must not enter the mean a second time. A stand-in scaler skips step 20."""
    class Scaler:
        s = 1024.0
        def scale(self, t): return t                      # noqa: E301,E704
        def unscale_(self, opt): pass                     # noqa: E301,E704
        def is_enabled(self): return True                 # noqa: E301,E704
        def get_scale(self): return self.s                # noqa: E301,E704
        def state_dict(self): return {}                   # noqa: E301,E704
        def step(self, opt):                              # noqa: E301
            self.skip = t.step + 1 == 20
            if not self.skip:
                opt.step()
        def update(self):                                 # noqa: E301
            self.s = self.s / 2 if self.skip else self.s

    def evaluate(self, ids):
        loss = {5: 3.0, 10: 2.0, 15: 3.5}.get(self.step, 1.0)
        return {"loss": loss, "ppl": 2.718281828 ** loss, "tokens": 1, "oov": 0, "bits_per_token": loss}
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    t = _trainer(word_corpus, tmp_path, "train.averaging_patience=1", "train.eval_every=5", "train.max_steps=30",
                 "train.optimizer=adam")
    t.scaler = Scaler()
    t.fit()
    assert t.avg_start == 15 and t.avg_count == 1 + 15 - 1   # steps 16..30 but 20


def test_dropout_settings_may_change_on_resume_and_the_architecture_may_not(word_corpus, tmp_path):
    """The regularisers act in training only, so a resumed run may change them (e.g. less dropout
    for a last stretch); model.* keys the weights depend on stay refused."""
    import yaml
    from rnnlm.checkpoint import load_checkpoint
    from test_train import _cfg
    run = tmp_path / "r"
    Trainer(_cfg(word_corpus, "train.max_steps=10", "model.dropout=0.3"), run, progress=False).fit()
    t = Trainer(build_config(None, ["train.max_steps=20", "model.dropout=0.1", "model.weight_drop=0.2",
                                    "model.locked_dropout=true"]), run, resume=True, progress=False)
    assert (t.model.drop_in.p, t.model.drop_w.p, t.model.drop_hid.locked) == (0.1, 0.2, True)
    t.fit()
    saved = load_checkpoint(run / "last.pt")["config"]["model"]
    assert (saved["dropout"], saved["weight_drop"], saved["locked_dropout"]) == (0.1, 0.2, True)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weight_drop"] == 0.2
    # config.yaml rewritten by a resume that died before its first save: the directory still resumes
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["dropout_embedding"] = 0.1
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    Trainer(build_config(None, ["train.max_steps=25"]), run, resume=True, progress=False).fit()
    with pytest.raises(UsageError, match="dropout settings"):
        Trainer(build_config(None, ["train.max_steps=30", "model.hidden_size=8"]), run, resume=True, progress=False)


# -- variable-length BPTT ---------------------------------------------------------------------------------
def test_fixed_window_bounds_are_bptt_windows():
    from rnnlm.data import window_bounds
    for T in (2, 3, 10, 100, 101):
        for bptt in (1, 3, 7, 35):
            b = window_bounds(T - 1, bptt)
            assert len(b) - 1 == (T - 2) // bptt + 1                      # every target position once
            assert list(b[:-1]) == list(range(0, T - 1, bptt)) and b[-1] == T - 1


@pytest.mark.parametrize("bptt", [3, 20, 70])
def test_variable_window_bounds_cover_the_text_with_awd_lengths(bptt):
    import numpy as np
    from rnnlm.data import window_bounds
    n = 200_000
    torch.manual_seed(0)
    np.random.seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    b = window_bounds(n, bptt, seed=1234, epoch=0)
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    L = np.diff(b)
    assert b[0] == 0 and b[-1] == n and (L > 0).all()          # every target once, in order
    lo, hi = max(1, min(5, bptt)), bptt + 20
    assert L[:-1].min() >= lo and L.max() <= hi
    # N(bptt, 5) 95 % of the time, N(bptt / 2, 5) otherwise, truncated to whole tokens
    if bptt >= 20:
        assert abs(L.mean() - (0.95 * bptt + 0.05 * bptt / 2 - 0.5)) < 0.3
    if bptt == 70:  # the half windows, N(35, 5), stand apart from N(70, 5): about one in 20
        assert abs((L < 0.75 * bptt).mean() - 0.05) < 0.015
    assert np.array_equal(b, window_bounds(n, bptt, seed=1234, epoch=0))   # reproducible
    assert not np.array_equal(b[:50], window_bounds(n, bptt, seed=1234, epoch=1)[:50])  # a new cut each epoch


def test_variable_bptt_trains_every_token_once_per_epoch_with_scaled_lr(word_corpus, tmp_path, monkeypatch):
    import rnnlm.train as T
    from test_train import _cfg
    seen = []
    real = T.clipped_sgd_step
    monkeypatch.setattr(T, "clipped_sgd_step", lambda params, lr, clip: (seen.append(lr), real(params, lr, clip))[1])
    args = ("train.variable_bptt=true", "train.optimizer=sgd", "train.lr=2", "train.lr_schedule=constant",
            "train.max_steps=null", "train.epochs=2", "train.batch_size=64", "train.eval_every=null")
    t = Trainer(_cfg(word_corpus, *args), tmp_path / "v", progress=False)
    b0 = t._bounds.copy()
    end = t.fit()
    rows = t.train_data.size(0) - 1
    assert end["tokens"] == 2 * rows * 64                      # both epochs: every target position once
    assert end["step"] == len(seen) and len(seen) != 2 * (-(-rows // 8))
    assert seen[:len(b0) - 1] == pytest.approx([2 * l / 8 for l in (b0[1:] - b0[:-1])])
    assert not all(s == 2.0 for s in seen) and all(type(s) is float for s in seen)  # plain floats in checkpoints
    from rnnlm.cudagraph import graph_blocker
    assert "variable_bptt" in graph_blocker(torch.device("cuda"), "fp32", False, False, False, variable_bptt=True)


def test_variable_bptt_resumes_exactly_across_an_epoch(word_corpus, tmp_path):
    from test_train import _check_exact_resume
    _check_exact_resume(word_corpus, tmp_path, "train.variable_bptt=true", "train.batch_size=64", "model.dropout=0.2",
                        "train.optimizer=sgd", "train.lr=2")


# -- train.init_from: a new run from a trained model -------------------------------------------------------
def test_init_from_starts_with_the_trained_weights_and_vocabulary(word_corpus, tmp_path, capsys):
    """Fine-tuning: a new run on other text starts from the trained weights (its first validation is the
    trained model's), keeps the vocabulary (unknown words read as <unk>) and the tokenizer, and starts its
    optimizer and schedule afresh; the dropout settings may change."""
    import json

    from rnnlm.checkpoint import load_checkpoint
    from test_train import _cfg
    Trainer(_cfg(word_corpus, "train.max_steps=30"), tmp_path / "base", progress=False).fit()
    base = load_checkpoint(tmp_path / "base" / "best.pt")
    other = tmp_path / "other.txt"
    words = (word_corpus.read_text().split() * 3)[:6000]
    other.write_text("\n".join(" ".join(words[i:i + 12] + ["zebra"]) for i in range(0, len(words), 12)) + "\n")
    cfg = build_config(None, [f"data.path={other}", "train.init_from=" + str(tmp_path / "base"), "train.max_steps=10",
                              "train.eval_every=10", "model.weight_drop=0.2", "train.batch_size=4", "train.bptt=8"])
    t = Trainer(cfg, tmp_path / "ft", progress=False)
    names = [n for n, _ in t.model.named_parameters()]
    assert all(torch.equal(dict(t.model.named_parameters())[n].detach(), base["model"][n]) for n in names)
    assert t.vocab.to_dict(t.tokenizer)["tokens"] == base["vocab"]["tokens"]
    assert t.cfg.data.level == "word" and t.cfg.model.hidden_size == 32 and t.cfg.model.weight_drop == 0.2
    assert t.step == 0 and t.corpus.oov["train"] > 0             # "zebra" is not in the trained vocabulary
    t.fit()
    assert "starting from" in capsys.readouterr().err
    saved = json.loads(json.dumps(load_checkpoint(tmp_path / "ft" / "last.pt")["config"]))
    assert saved["train"]["init_from"] == str(tmp_path / "base") and saved["model"]["hidden_size"] == 32
    first = [json.loads(l) for l in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["event"] == "train" and first[0]["step"] == 10 and first[0]["lr"] == cfg.train.lr
    # resuming the fine-tuning run is an ordinary resume
    Trainer(build_config(None, ["train.max_steps=15"]), tmp_path / "ft", resume=True, progress=False).fit()
    assert load_checkpoint(tmp_path / "ft" / "last.pt")["step"] == 15


def test_init_from_refuses_another_architecture_or_tokenizer(word_corpus, tmp_path):
    """Every model.* and vocabulary key the new run states -- on the command line or in its config file,
    also at a default value -- must be the trained model's; the dropout settings may differ."""
    from rnnlm.checkpoint import load_checkpoint
    from test_train import _cfg
    Trainer(_cfg(word_corpus, "train.max_steps=5", "model.dropout=0.3"), tmp_path / "base", progress=False).fit()
    init = f"train.init_from={tmp_path / 'base'}"
    data = f"data.path={word_corpus}"
    with pytest.raises(UsageError, match=r"model.hidden_size=64 differs from the model's \(32"):
        Trainer(build_config(None, [data, init, "model.hidden_size=64"]), tmp_path / "a")
    with pytest.raises(UsageError, match="model.hidden_size=256 differs"):   # the default, but stated
        Trainer(build_config(None, [data, init, "model.hidden_size=256"]), tmp_path / "a")
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("model:\n  hidden_size: 256\n")
    with pytest.raises(UsageError, match="model.hidden_size=256 differs"):
        Trainer(build_config(cfg_file, [data, init]), tmp_path / "a")
    with pytest.raises(UsageError, match="data.level=char differs"):
        Trainer(build_config(None, [data, init, "data.level=char"]), tmp_path / "b")
    with pytest.raises(UsageError, match="data.min_freq=3 differs"):
        Trainer(build_config(None, [data, init, "data.min_freq=3"]), tmp_path / "b")
    with pytest.raises(UsageError, match="checkpoint not found"):
        Trainer(build_config(None, [data, f"train.init_from={tmp_path / 'nope.pt'}"]), tmp_path / "c")
    # the model's own values, stated, are fine; eos 'line' is what 'auto' means at word level;
    # a config file stating dropout 0 (the default) sets it
    cfg_file.write_text("model:\n  hidden_size: 32\n  dropout: 0.0\ndata:\n  eos: line\n  level: word\n")
    t = Trainer(build_config(cfg_file, [data, init, "train.max_steps=2"]), tmp_path / "d", progress=False)
    assert (t.cfg.model.hidden_size, t.cfg.model.num_layers, t.cfg.model.dropout) == (32, 2, 0.0)
    t.fit()
    saved = load_checkpoint(tmp_path / "d" / "last.pt")["config"]
    assert saved["data"]["min_freq"] == 1 and saved["data"]["eos"] == "auto"   # the model's, recorded


def test_resume_checks_model_keys_one_by_one(word_corpus, tmp_path):
    """--resume with a model.* key equal to the run's own is accepted (it used to be refused when the
    other keys were left out); a different one is refused, naming it."""
    from test_train import _cfg
    run = tmp_path / "r"
    Trainer(_cfg(word_corpus, "train.max_steps=5"), run, progress=False).fit()
    Trainer(build_config(None, ["train.max_steps=8", "model.hidden_size=32"]), run, resume=True,
            progress=False).fit()
    with pytest.raises(UsageError, match=r"cannot change model.num_layers when resuming \(the run has 2, not 3\)"):
        Trainer(build_config(None, ["train.max_steps=9", "model.num_layers=3"]), run, resume=True)


def test_variable_windows_count_every_epoch_in_the_step_total(word_corpus, tmp_path):
    import numpy as np
    from rnnlm.data import window_bounds
    from test_train import _cfg
    t = Trainer(_cfg(word_corpus, "train.variable_bptt=true", "train.batch_size=64", "train.epochs=5",
                     "train.max_steps=null"), tmp_path / "v", progress=False)
    n = t.train_data.size(0) - 1
    counts = [len(window_bounds(n, 8, 1234, e)) - 1 for e in range(5)]
    assert len(set(counts)) > 1 and t.total_windows() == sum(counts) == t.schedule.total_steps()
    assert np.array_equal(t._bounds, window_bounds(n, 8, 1234, 0))


def test_resume_warns_when_the_windows_are_cut_differently_mid_epoch(word_corpus, tmp_path, capsys):
    from test_train import _cfg
    run = tmp_path / "r"
    Trainer(_cfg(word_corpus, "train.max_steps=5"), run, progress=False).fit()
    Trainer(build_config(None, ["train.max_steps=8", "train.bptt=6"]), run, resume=True, progress=False).fit()
    assert "train.bptt changed in the middle of epoch 1" in capsys.readouterr().err
    Trainer(build_config(None, ["train.max_steps=10"]), run, resume=True, progress=False).fit()
    assert "changed in the middle" not in capsys.readouterr().err


def test_print_config_shows_the_model_a_run_starts_from(word_corpus, tmp_path):
    import subprocess
    import sys

    import yaml
    from test_train import _cfg
    Trainer(_cfg(word_corpus, "train.max_steps=5"), tmp_path / "base", progress=False).fit()
    out = subprocess.run([sys.executable, "-m", "rnnlm", "train", "--print-config", f"--data={word_corpus}",
                          f"train.init_from={tmp_path / 'base'}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert (cfg["model"]["hidden_size"], cfg["data"]["level"]) == (32, "word")


def test_resume_checks_data_keys_one_by_one(word_corpus, tmp_path):
    from test_train import _cfg
    run = tmp_path / "r"
    Trainer(_cfg(word_corpus, "train.max_steps=5"), run, progress=False).fit()
    Trainer(build_config(None, ["train.max_steps=7", "data.level=word"]), run, resume=True, progress=False).fit()
    with pytest.raises(UsageError, match=r"cannot change data.lowercase when resuming \(the run has False"):
        Trainer(build_config(None, ["train.max_steps=9", "data.lowercase=true"]), run, resume=True)
    Trainer(build_config(None, ["train.max_steps=9", f"data.path={word_corpus}"]), run, resume=True,
            progress=False).fit()
