"""The `rnnlm` command line: parses, builds the config, calls the library, renders with rich.

Exit codes: 0 success · 1 failure while running · 2 bad usage or bad input. User errors are
one or a few lines on stderr, never a traceback (``rnnlm --debug COMMAND`` shows one).
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import RnnlmError, UsageError

app = typer.Typer(
    name="rnnlm",
    help="Train, sample from and evaluate recurrent (RNN/GRU/LSTM) language models on your own text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rnnlm {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.", metavar=""),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.", metavar=""),
) -> None:
    _state["debug"] = debug


_PACKAGE_DIR = Path(__file__).resolve().parent


def _from_rnnlm(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print warnings that rnnlm's own code raised (e.g. unknown prime tokens); drop library noise.

    The issuer is the innermost frame outside the warnings machinery, not `filename`: with
    `stacklevel` and decorators such as `torch.no_grad`, `filename` may name a torch file.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == warnings.__file__:
        frame = frame.f_back
    if (frame is not None and _from_rnnlm(frame.f_code.co_filename)) or _from_rnnlm(filename):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)


def _error(message: str) -> None:
    """One error message on stderr; markup characters in it (paths, user text) are shown as is."""
    err_console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def _run(fn: Callable[[], None]) -> None:
    """Run a command body, mapping errors to one message and an exit code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            warnings.showwarning = _show_warning
            fn()
    except RnnlmError as e:
        if _state["debug"]:  # the traceback, but the same exit code
            traceback.print_exc()
        _error(str(e))
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130)
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(0)
    except typer.Exit:
        raise
    except Exception as e:  # an unexpected failure: still no traceback unless --debug
        if _state["debug"]:
            raise
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or type(e).__name__ == "OutOfMemoryError":
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _error(f"out of memory ({first[:200]}); use a smaller model or batch (train.batch_size, "
                   f"eval-perplexity --batch-size, sample --num-samples)")
            raise typer.Exit(1)
        _error(f"{type(e).__name__}: {e}\n(this is a bug or an unexpected environment problem; run "
               f"`rnnlm --debug ...` for the traceback)")
        raise typer.Exit(1)


def _silence_stdout() -> None:
    """After a closed pipe (`rnnlm sample | head`), keep Python from complaining at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _path(value: Optional[str], option: str) -> Optional[Path]:
    """A path given on the command line; an empty one is a usage error (Path("") would mean ".")."""
    if value is None:
        return None
    if not value.strip():
        raise UsageError(f"{option} is empty; give a path")
    return Path(value)


def _device(name: str):
    from .train import select_device
    return select_device(name, "--device")


# -- train ---------------------------------------------------------------------------------------

@app.command(help="Train a language model. With no --config and no --data it trains a small char-level LSTM on "
                  "the embedded default corpus (the Python standard library's source), offline.\n\n"
                  "KEY=VALUE overrides use the config's dotted keys, e.g. model.hidden_size=650 train.lr=0.5 "
                  "data.level=word; values parse as YAML scalars. --print-config lists every key with its value "
                  "and meaning.")
def train(
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", show_default=False),
    config: Optional[str] = typer.Option(None, "--config", "-c", metavar="PATH", help="YAML config file."),
    data: Optional[str] = typer.Option(None, "--data", "-d", metavar="PATH",
                                       help="Shorthand for data.path=PATH (a text file, or a directory with "
                                            "train.txt and optionally valid.txt, test.txt; with data.glob='**/*.py', "
                                            "a directory whose matching files are the corpus)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH",
                                      help="Run directory (default runs/<config>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt.", metavar=""),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", metavar="",
                                            help="Force the rich progress bar on or off (default: on a terminal)."),
    print_config: bool = typer.Option(False, "--print-config", metavar="",
                                      help="Print the resolved config (defaults, --config, --data, KEY=VALUE) as "
                                           "YAML, every key with its meaning, and exit without training."),
) -> None:
    def body() -> None:
        from .config import build_config, commented_yaml
        from .train import Trainer

        cfg_path, out_dir = _path(config, "--config"), _path(out, "--out")
        items = list(overrides or [])
        if data is not None:
            _path(data, "--data")
            items.insert(0, f"data.path={json.dumps(data)}")
        cfg = build_config(cfg_path, items)
        if data is not None and config is None:
            cfg.name = Path(data).stem or "data"
        if print_config:
            if resume:
                raise UsageError("--print-config shows a new run's config; a resumed run's is RUN_DIR/config.yaml "
                                 "(KEY=VALUE given with --resume may change train.*, sample.*, data.path and the "
                                 "dropout settings only)")
            if cfg.train.init_from:  # the trained model's architecture and vocabulary settings, as the run uses them
                from .train import _start_from
                _, cfg = _start_from(cfg)
            sys.stdout.write(commented_yaml(cfg))
            return
        run_dir = out_dir if out_dir is not None else (Path(cfg.train.out) if cfg.train.out else None)
        trainer = Trainer(cfg, run_dir, resume=resume, console=err_console, progress=progress)
        trainer.fit()
        if trainer.dist.is_main:  # under torchrun, one line, not one per rank
            out_console.print(f"run directory: {escape(str(trainer.run_dir))}", soft_wrap=True)
        if trainer.stop_reason in ("SIGINT", "SIGTERM"):
            # stopped cleanly (last.pt saved) but not finished: 128 + the signal's number, as a shell
            # reports a process a signal ended, so `rnnlm train && next` does not go on
            raise typer.Exit(128 + int(getattr(signal, trainer.stop_reason)))
    _run(body)


# -- sample --------------------------------------------------------------------------------------

@app.command(help="Generate text from a trained model. Samples end at <eos> (not printed) or after --max-length "
                  "tokens; each is followed by a blank line. <unk> is never produced unless --allow-unk. "
                  "Bidirectional models sample with their forward direction.\n\n"
                  "Options left out take the checkpoint's sample.* config (by default: --num-samples 1, "
                  "--max-length 500, --temperature 0.8, --top-k 0, --top-p 1.0, no prime).")
def sample(
    checkpoint: str = typer.Option(..., "--checkpoint", "-m", metavar="PATH",
                                   help="Run directory (its best.pt) or a checkpoint."),
    prime: Optional[str] = typer.Option(None, "--prime", "-p", help="Text the samples continue."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Number of samples (one batch)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", "-l", help="Tokens per sample at most."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Softmax temperature; 0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most probable tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most probable token.", metavar=""),
    allow_unk: bool = typer.Option(False, "--allow-unk", help="Allow <unk> to be sampled.", metavar=""),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed for reproducible output."),
    as_json: bool = typer.Option(False, "--json", help='One JSON object per sample: {"text", "tokens", "stop", "generated"}.', metavar=""),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: Optional[str] = typer.Option(None, "--precision", metavar="fp32|bf16",
                                            help="bf16: large matrices read in bfloat16 (faster where memory is "
                                                 "the limit; scores within bfloat16's rounding). Default: the "
                                                 "checkpoint's sample.precision (fp32)."),
) -> None:
    def body() -> None:
        from .checkpoint import load_model
        from .sample import PRECISIONS, Sampler

        if precision is not None and precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")

        _check_sample_options(temperature, top_k, top_p, max_length, num_samples, seed)
        dev = _device(device)
        lm = load_model(_path(checkpoint, "--checkpoint"), dev)
        sc = lm.config.sample
        p = prime if prime is not None else sc.prime
        n = num_samples if num_samples is not None else sc.num_samples
        L = max_length if max_length is not None else sc.max_length
        t = temperature if temperature is not None else sc.temperature
        k = top_k if top_k is not None else sc.top_k
        tp = top_p if top_p is not None else sc.top_p
        _check_sample_options(t, k, tp, L, n)
        prec = precision if precision is not None else sc.precision
        sampler = Sampler(lm.model, lm.vocab, lm.tokenizer, dev, prec)
        stream = n == 1 and not as_json
        shown = []  # the prime is printed with the first generated piece, after any warning about it

        def on_text(piece: str) -> None:
            sys.stdout.write(piece if shown else p + piece)
            sys.stdout.flush()
            shown.append(True)

        samples = sampler.generate(p, n, L, t, k, tp, greedy, allow_unk, seed, on_text if stream else None)
        for s in samples:
            if as_json:
                sys.stdout.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
            elif stream:
                sys.stdout.write(("" if shown else p) + "\n\n")
            else:
                sys.stdout.write(s.text + "\n\n")
        sys.stdout.flush()
    _run(body)


def _check_sample_options(t: Optional[float], k: Optional[int], tp: Optional[float], length: Optional[int],
                          n: Optional[int], seed: Optional[int] = None) -> None:
    from .sample import check_options
    check_options(t, k, tp, length, n, seed, flags=True)


# -- eval-perplexity -----------------------------------------------------------------------------

@app.command("eval-perplexity",
             help="Perplexity of a text file: every token (each <eos> too) predicted once, the hidden state carried "
                  "over the whole file. Larger --batch-size values evaluate contiguous pieces in parallel; each "
                  "piece's starting state is checked against the exact carried state and re-run where they differ, "
                  "so every batch size gives the batch-1 number. Bidirectional models report forward, backward and "
                  "combined (geometric mean) perplexity.")
def eval_perplexity(
    checkpoint: str = typer.Option(..., "--checkpoint", "-m", metavar="PATH",
                                   help="Run directory (its best.pt) or a checkpoint."),
    data: str = typer.Option(..., "--data", "-d", metavar="PATH", help="Text file to evaluate (with --glob, a directory)."),
    glob: Optional[str] = typer.Option(None, "--glob", metavar="PATTERN",
                                       help="Evaluate the files under the --data directory matching PATTERN "
                                            "('**/*.py'), gathered as data.glob gathers them for training: in "
                                            "path order, a blank line between files; hidden, binary and blank files and "
                                            "rnnlm run directories left out."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Pieces evaluated in parallel; the result is the same at every batch size (1 = one sequential pass)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object.", metavar=""),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    encoding: Optional[str] = typer.Option(None, "--encoding", metavar="ENC", help="Text encoding of the file (default: the one the model was trained on, its data.encoding)."),
    cache_size: Optional[str] = typer.Option(None, "--cache-size", metavar="N[,N...]",
                                             help="Also report the perplexity with a continuous cache (Grave et al. 2017) "
                                                  "over the last N positions; a list scores each size from one pass. "
                                                  "The plain numbers are unchanged."),
    cache_theta: Optional[str] = typer.Option(None, "--cache-theta", metavar="T[,T...]",
                                              help="The cache's sharpness θ >= 0 (default 1.0); a comma-separated list "
                                                   "scores each value. Choose it on validation text."),
    cache_lambda: Optional[str] = typer.Option(None, "--cache-lambda", metavar="L[,L...]",
                                               help="The cache's weight λ in [0, 1] (default 0.1); a list scores each "
                                                    "value (with a θ list, every pair)."),
    dynamic_lr: Optional[str] = typer.Option(None, "--dynamic-lr", metavar="LR[,LR...]",
                                             help="Also report the perplexity under dynamic evaluation (Krause et al. "
                                                  "2018): the model takes an SGD step of this size on each segment "
                                                  "after scoring it. One sequential pass per value; choose it on "
                                                  "validation text."),
    dynamic_decay: Optional[str] = typer.Option(None, "--dynamic-decay", metavar="D[,D...]",
                                                help="With --dynamic-lr: pull the adapted weights back toward the "
                                                     "trained ones by this share each step, in [0, 1] (default 0); "
                                                     "a list tries each value with each learning rate."),
    dynamic_segment: Optional[int] = typer.Option(None, "--dynamic-segment", metavar="N",
                                                  help="With --dynamic-lr: tokens per segment, one step after each "
                                                       "(default 20)."),
    dynamic_rms_data: Optional[str] = typer.Option(None, "--dynamic-rms-data", metavar="FILE",
                                                   help="With --dynamic-lr: Krause et al.'s RMS rule instead of SGD. "
                                                        "Each weight's root-mean-square gradient is measured once on "
                                                        "FILE (the training text); each step is divided by it and "
                                                        "--dynamic-decay scaled by it. Its learning rates are far "
                                                        "smaller than SGD's (PTB: 1e-4 where SGD took 1)."),
    dynamic_rms_eps: Optional[str] = typer.Option(None, "--dynamic-rms-eps", metavar="E[,E...]",
                                                  help="With --dynamic-rms-data: ε, added to each weight's RMS "
                                                       "gradient, as a share of their mean (default 0.1); it caps how "
                                                       "much faster rarely-updated weights adapt. A list tries each."),
) -> None:
    def body() -> None:
        from .cache import CacheSpec, parse_sizes, parse_values
        from .checkpoint import load_model
        from .data import check_encoding, glob_corpus_path
        from .dynamic import RMS_EPS, DynamicSpec
        from .evaluate import perplexity

        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        _requires(cache_size, "--cache-size N", "the continuous cache", "how many past positions it holds, e.g. 500",
                  {"--cache-theta": cache_theta, "--cache-lambda": cache_lambda})
        _requires(dynamic_lr, "--dynamic-lr LR", "dynamic evaluation",
                  "the size of its steps, e.g. 1.0 for SGD or 1e-4 for the RMS rule",
                  {"--dynamic-decay": dynamic_decay, "--dynamic-segment": dynamic_segment,
                   "--dynamic-rms-data": dynamic_rms_data, "--dynamic-rms-eps": dynamic_rms_eps})
        cache = dynamic = None
        if cache_size is not None:
            sizes = parse_sizes(cache_size, "--cache-size")
            thetas = parse_values(cache_theta, "--cache-theta") if cache_theta is not None else (1.0,)
            lambdas = parse_values(cache_lambda, "--cache-lambda") if cache_lambda is not None else (0.1,)
            cache = [CacheSpec(size, thetas, lambdas) for size in sizes]
        if dynamic_lr is not None:
            rms_data = None
            _requires(dynamic_rms_data, "--dynamic-rms-data FILE", "the RMS rule", "the training text",
                      {"--dynamic-rms-eps": dynamic_rms_eps})
            if dynamic_rms_data is not None:
                rms_data = _path(dynamic_rms_data, "--dynamic-rms-data")
                if not rms_data.is_file():
                    raise UsageError(f"--dynamic-rms-data {dynamic_rms_data} is not a regular file; give the "
                                     f"training text" if rms_data.exists()
                                     else f"--dynamic-rms-data file not found: {dynamic_rms_data}")
            dynamic = DynamicSpec(parse_values(dynamic_lr, "--dynamic-lr"),
                                  0.0 if dynamic_decay is None else parse_values(dynamic_decay, "--dynamic-decay"),
                                  20 if dynamic_segment is None else dynamic_segment, rms_data,
                                  RMS_EPS if dynamic_rms_eps is None else parse_values(dynamic_rms_eps,
                                                                                        "--dynamic-rms-eps"))
        ckpt = _path(checkpoint, "--checkpoint")
        data_path = _path(data, "--data")
        if glob is not None:
            if not data_path.is_dir():
                raise UsageError(f"--glob needs --data to be a directory, and {data} is "
                                 f"{'not one' if data_path.exists() else 'not found'}")
        elif data_path.is_dir():
            raise UsageError(f"--data {data} is a directory; give the text file to evaluate (e.g. {data}/test.txt), "
                             f"or add --glob '**/*.txt' to evaluate the files in it")
        elif not data_path.is_file():
            raise UsageError(f"--data {data} is not a regular file; give the text file to evaluate"
                             if data_path.exists() else f"evaluation file not found: {data}")
        enc = check_encoding(encoding, "--encoding") if encoding is not None else None
        dev = _device(device)
        lm = load_model(ckpt, dev)
        enc, errors, what = enc or lm.config.data.encoding, lm.config.data.errors, str(data)
        if glob is not None:
            data_path, what = glob_corpus_path(data_path, glob, enc, errors, option="--glob")
        res = perplexity(lm.model, lm.vocab, lm.tokenizer, data_path, batch_size, dev, enc, errors,
                         progress="auto", cache=cache, dynamic=dynamic)
        if glob is not None:  # "file" is the gathered text; say where it came from
            res["source"] = what
        if as_json:
            sys.stdout.write(json.dumps(res) + "\n")
            return
        out_console.print(escape(what), soft_wrap=True)  # the file on a line of its own: a long path
        table = Table(show_header=True)                          # stays whole, not wrapped in a title
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [("tokens", f"{res['tokens']:,}"), ("oov", f"{res['oov']:,} ({100 * res['oov_rate']:.2f} %)"),
                ("loss (nats/token)", f"{res['loss']:.4f}"), ("perplexity", f"{res['ppl']:.3f}"),
                ("bits per token", f"{res['bits_per_token']:.4f}")]
        for key, label in (("forward_ppl", "forward perplexity"), ("backward_ppl", "backward perplexity"),
                           ("word_ppl", "word-level perplexity")):
            if key in res:
                rows.append((label, f"{res[key]:.3f}"))
        both = [{**c, **{k: e[k] for k in ("lr", "segment", "decay", "rule", "eps") if k in e}}
                for e in res.get("dynamic", []) for c in e.get("cache", [])]
        several = len({e["size"] for e in res.get("cache", [])}) > 1       # a column for the cache size
        cache_params = ("size", "theta", "lambda") if several else ("theta", "lambda")
        dyn = res.get("dynamic", [])
        decays = len({e["decay"] for e in dyn}) > 1                       # a column for the decay
        epses = len({e.get("eps") for e in dyn}) > 1                      # and for the RMS rule's ε
        dyn_params = ("lr",) + (("decay",) if decays else ()) + (("eps",) if epses else ())
        dyn_title = ("with dynamic evaluation ({rule_name}segments of {segment}" + ("" if decays else ", decay {decay:g}")
                     + ("" if epses or not dyn or "eps" not in dyn[0] else ", ε {eps:g}") + ")")
        grids = []
        for entries, label, params in (
                (res.get("cache", []), "with a continuous cache" + ("" if several else " of {size} positions"),
                 cache_params),
                (dyn, dyn_title, dyn_params),
                (both, "with dynamic evaluation and a cache" + ("" if several else " of {size}"),
                 (*dyn_params, *cache_params))):
            if len(entries) == 1:
                e = entries[0]
                parts = [f"{_SYMBOLS[p]}={e[p]:g}" for p in params]
                if "theta" in params:
                    parts.insert(0, f"N={e['size']}")
                if "lr" in params:
                    parts.append(f"{_RULE_NAMES[e.get('rule', 'sgd')]}segment {e['segment']}, decay {e['decay']:g}"
                                 + (f", ε {e['eps']:g}" if "eps" in e else ""))
                desc = ", ".join(parts)
                what = {("theta", "lambda"): "cache", ("lr",): "dynamic evaluation"}.get(
                    params, "dynamic evaluation and cache")
                rows.append((f"with {what} ({desc})", f"{e['ppl']:.3f}"))
            elif entries:
                grids.append((label.format(**entries[0], rule_name=_RULE_NAMES[entries[0].get("rule", "sgd")]),
                               params, entries))
        for r in rows:
            table.add_row(*r)
        out_console.print(table)
        for title, params, entries in grids:
            best = min(range(len(entries)), key=lambda i: entries[i]["loss"])
            grid = Table(title=title, show_header=True, min_width=len(title))   # the title on one line
            for name in (*[_SYMBOLS[p] for p in params], "perplexity", "loss (nats/token)"):
                grid.add_column(name, justify="right")
            grid.add_column("")
            for i, e in enumerate(entries):
                grid.add_row(*[f"{e[p]:g}" for p in params], f"{e['ppl']:.3f}", f"{e['loss']:.4f}",
                             "lowest" if i == best else "")
            out_console.print(grid)
    _run(body)


_SYMBOLS = {"size": "N", "theta": "θ", "lambda": "λ", "lr": "lr", "decay": "decay", "eps": "ε"}
_RULE_NAMES = {"sgd": "", "rms": "RMS, "}   # how a dynamic entry's rule is named in the text output


def _requires(main, main_option: str, what: str, hint: str, others: dict) -> None:
    """An option that only refines `main_option` was given without it: a usage error naming both."""
    if main is None:
        for option, value in others.items():
            if value is not None:
                raise UsageError(f"{option} sets up {what}; give {main_option} too ({hint})")


# -- score ---------------------------------------------------------------------------------------

@app.command(help="Score sentences, one per line, each independently (fresh state, <eos> appended), as a speech "
                  "recogniser rescoring its candidates would. logprob is the natural-log probability of the "
                  "sentence including its <eos>. Every line is scored, an empty one too (as <eos> alone), so "
                  "the i-th result is the i-th line.")
def score(
    checkpoint: str = typer.Option(..., "--checkpoint", "-m", metavar="PATH",
                                   help="Run directory (its best.pt) or a checkpoint."),
    input: str = typer.Option("-", "--input", "-i", help="File with one sentence per line, or - for stdin."),
    as_json: bool = typer.Option(False, "--json", help='One JSON object per line: {"text","tokens","logprob","ppl"}.', metavar=""),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    encoding: Optional[str] = typer.Option(None, "--encoding", metavar="ENC", help="Text encoding of the file (default: the one the model was trained on, its data.encoding)."),
) -> None:
    def body() -> None:
        from .checkpoint import load_model
        from .data import check_encoding
        from .evaluate import score_sentences

        raw, name = _read_input(input)
        enc = check_encoding(encoding, "--encoding") if encoding is not None else None
        dev = _device(device)
        lm = load_model(_path(checkpoint, "--checkpoint"), dev)
        lines = _sentences(raw, name, enc or lm.config.data.encoding, lm.config.data.errors)
        results = score_sentences(lm.model, lm.vocab, lm.tokenizer, lines, dev)
        if as_json:
            for r in results:
                sys.stdout.write(json.dumps({k: r[k] for k in ("text", "tokens", "logprob", "ppl")},
                                            ensure_ascii=False) + "\n")
            return
        table = Table(show_header=True)
        table.add_column("#", justify="right")
        table.add_column("sentence")
        table.add_column("tokens", justify="right")
        table.add_column("log p", justify="right")
        table.add_column("ppl", justify="right")
        for i, r in enumerate(results, 1):
            table.add_row(str(i), escape(r["text"]), str(r["tokens"]), f"{r['logprob']:.3f}", f"{r['ppl']:.2f}")
        out_console.print(table)
    _run(body)


def _read_input(src: str) -> tuple[bytes, str]:
    """The bytes of --input (a file, or - for standard input) and a name for messages."""
    _path(src, "--input")
    if src == "-":
        return sys.stdin.buffer.read(), "standard input"
    p = Path(src)
    if p.is_dir():
        raise UsageError(f"--input {p} is a directory; give a text file with one sentence per line")
    if not p.is_file():
        raise UsageError(f"--input {p} is not a regular file; give a text file with one sentence per line"
                         if p.exists() else f"input file not found: {p}")
    try:
        return p.read_bytes(), str(p)
    except OSError as e:
        raise UsageError(f"cannot read --input {p}: {e.strerror or e}") from None


def _sentences(data: bytes, name: str, encoding: str = "utf-8", errors: str = "strict") -> list[str]:
    """The lines of `data` decoded with `encoding` (a UTF-8 byte-order mark is dropped), every one a
    sentence, empty ones included, so that the i-th result is the i-th line."""
    from .data import UTF16_BOMS, utf16_error

    codec = codecs.lookup(encoding).name
    if codec == "utf-8" and data.startswith(UTF16_BOMS):  # as training and eval-perplexity say it
        raise utf16_error(name)
    if b"\x00" in data:
        raise UsageError(f"{name} looks like a binary file; give one sentence per line of text")
    try:
        text = data.decode("utf-8-sig" if codec == "utf-8" else codec, errors)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(f"{name}: not valid {codec} at line {line}, byte offset {e.start}; give --encoding "
                         f"if the file uses another encoding") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":  # the newline that ends the last line does not start another
        lines.pop()
    if not lines:
        raise UsageError(f"{name} holds no sentences (one per line expected)")
    return lines


# -- plot ----------------------------------------------------------------------------------------

@app.command(help="Draw loss curves (train and valid loss against tokens, time or steps): one run into its "
                  "loss.png or --out, several runs overlaid into --out.")
def plot(
    run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR",
                                         help="Run directories with metrics.jsonl (several: one chart)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH",
                                       help="Image path (default RUN_DIR/loss.png for one run; needed for several)."),
    x: str = typer.Option("tokens", "--x", help="Horizontal axis: tokens, time (seconds since the start, evaluations included) or step."),
) -> None:
    def body() -> None:
        from .plot import plot_run, plot_runs
        if len(run_dirs) > 1 and out is None:
            raise UsageError("plotting several runs needs --out IMAGE.png")
        runs = [_path(r, "RUN_DIR") for r in run_dirs]
        _path(out, "--out")  # (the string itself goes on: a trailing "/" says it names a folder)
        path = plot_run(runs[0], out, x) if len(runs) == 1 else plot_runs(runs, out, x)
        out_console.print(f"wrote {escape(str(path))}", soft_wrap=True)
    _run(body)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    # Under torchrun, leave without interpreter teardown once the work is done and flushed: gloo's
    # and the rendezvous store's C++ threads can otherwise abort the process at exit ("terminate
    # called without an active exception"), and torchrun would report a finished run as failed.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
