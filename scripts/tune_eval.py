"""Choose the continuous cache's and dynamic evaluation's settings on validation text, then report
the test perplexity with them.

The honest protocol (Grave et al. 2017; Krause et al. 2018): every setting is chosen on the
validation text only, and the test text is evaluated once with the chosen values, next to the
plain number. The model runs over the validation text once and every cache size and (θ, λ) of the
grid is scored from the stored features (`rnnlm eval-perplexity --cache-size N,...
--cache-theta ... --cache-lambda ...` does the same); each dynamic-evaluation learning rate is
one sequential pass (`--dynamic-lr`), for each decay given; with `--dynamic-rms-data` (the RMS rule),
its statistics are measured on that text (the training text) once, and serve the validation grid
and the test pass.

usage: python scripts/tune_eval.py --checkpoint RUN_DIR --valid VALID.txt --test TEST.txt
                                   [--sizes 100,500,2000] [--thetas 0.1,...] [--lambdas 0.05,...]
                                   [--dynamic-lrs 0.3,1,3 [--dynamic-segment 20] [--dynamic-decay 0[,D...]]
                                    [--dynamic-rms-data TRAIN.txt [--dynamic-rms-eps 0.1[,E...]]]]
                                   [--no-cache] [--batch-size 16] [--device auto] [--json OUT.json]
prints: the best setting per cache size and per learning rate on validation, the chosen ones, and
        the test perplexity without and with each
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from rnnlm.cache import CacheSpec, parse_sizes, parse_values
from rnnlm.checkpoint import load_model
from rnnlm.dynamic import RMS_EPS, DynamicSpec
from rnnlm.errors import UsageError
from rnnlm.evaluate import encode_rms_text, perplexity, rms_statistics
from rnnlm.train import select_device


def _best(entries: list[dict]) -> dict:
    """The entry of lowest validation loss; a diverged setting (NaN or infinite loss) is never chosen."""
    finite = [e for e in entries if math.isfinite(e["loss"])]
    if not finite:
        raise UsageError("every setting diverged on the validation text (non-finite loss); try smaller values")
    return min(finite, key=lambda e: e["loss"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", "-m", required=True, help="run directory (its best.pt) or a checkpoint")
    ap.add_argument("--valid", required=True, help="validation text: the values are chosen on it")
    ap.add_argument("--test", required=True, help="test text: evaluated once with the chosen values")
    ap.add_argument("--sizes", default="100,500,2000", help="cache sizes to try")
    ap.add_argument("--thetas", default="0.1,0.3,0.5,1,2,3,5")
    ap.add_argument("--lambdas", default="0.05,0.1,0.15,0.2,0.3,0.4,0.5")
    ap.add_argument("--no-cache", action="store_true", help="tune dynamic evaluation only")
    ap.add_argument("--dynamic-lrs", help="dynamic-evaluation learning rates to try (none: no dynamic evaluation)")
    ap.add_argument("--dynamic-segment", type=int, default=20)
    ap.add_argument("--dynamic-decay", default="0", help="decay, or a comma-separated list to try")
    ap.add_argument("--dynamic-rms-data", metavar="TRAIN.txt",
                    help="the RMS rule, its statistics measured on this text (the training text)")
    ap.add_argument("--dynamic-rms-eps", default=None, help="the RMS rule's ε (share of the mean RMS), or a list")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    out: dict = {"checkpoint": args.checkpoint, "valid": args.valid, "test": args.test}
    try:
        device = select_device(args.device, "--device")
        lm = load_model(args.checkpoint, device)

        def evaluate(path, **kw):
            return perplexity(lm.model, lm.vocab, lm.tokenizer, path, args.batch_size, device,
                              lm.config.data.encoding, lm.config.data.errors, **kw)
        t0 = time.perf_counter()
        specs, dynamic = None, None
        if not args.no_cache:
            thetas, lambdas = parse_values(args.thetas, "--thetas"), parse_values(args.lambdas, "--lambdas")
            specs = [CacheSpec(size, thetas, lambdas) for size in parse_sizes(args.sizes, "--sizes")]
        if args.dynamic_rms_eps is not None and args.dynamic_rms_data is None:
            raise UsageError("--dynamic-rms-eps sets up the RMS rule; give --dynamic-rms-data TRAIN.txt too")
        if args.dynamic_rms_data is not None and not args.dynamic_lrs:
            raise UsageError("--dynamic-rms-data sets up dynamic evaluation; give --dynamic-lrs too (e.g. 1e-4)")
        if args.dynamic_rms_data is not None and not Path(args.dynamic_rms_data).is_file():
            raise UsageError(f"--dynamic-rms-data: no such file: {args.dynamic_rms_data}")
        if args.dynamic_lrs:
            dynamic = DynamicSpec(parse_values(args.dynamic_lrs, "--dynamic-lrs"),
                                  parse_values(args.dynamic_decay, "--dynamic-decay"), args.dynamic_segment, None,
                                  RMS_EPS if args.dynamic_rms_eps is None else parse_values(args.dynamic_rms_eps,
                                                                                             "--dynamic-rms-eps"))
            if args.dynamic_rms_data is not None:      # the RMS rule: statistics measured once, for valid and test
                t1 = time.perf_counter()
                rms = rms_statistics(lm.model, encode_rms_text(args.dynamic_rms_data, lm.vocab, lm.tokenizer,
                                                               lm.config.data.encoding, lm.config.data.errors),
                                     args.dynamic_segment, device)
                print(f"RMS statistics: {rms.tokens:,} tokens of {args.dynamic_rms_data} in "
                      f"{time.perf_counter() - t1:.1f} s", flush=True)
                dynamic = dataclasses.replace(dynamic, rms_data=rms)
        if specs is None and dynamic is None:
            raise UsageError("nothing to tune: --no-cache without --dynamic-lrs")
        chosen: dict = {}
        if specs:
            res = evaluate(args.valid, cache=specs)            # one pass serves every cache size
            out["valid_ppl"] = res["ppl"]
            out["cache_per_size"] = []
            for spec in specs:
                grid = [e for e in res["cache"] if e["size"] == spec.size]
                best = _best(grid)
                out["cache_per_size"].append({"size": spec.size, "best": best, "grid": grid})
                print(f"valid, cache {spec.size:>5}: best θ={best['theta']:g} λ={best['lambda']:g} "
                      f"ppl {best['ppl']:.2f} (plain {res['ppl']:.2f})", flush=True)
            chosen["cache"] = _best(res["cache"])
        if dynamic:
            res = evaluate(args.valid, dynamic=dynamic)          # (a cache on top would be wasted here)
            out["valid_ppl"], out["dynamic_grid"] = res["ppl"], res["dynamic"]
            for e in out["dynamic_grid"]:
                eps = f" ε {e['eps']:g}" if "eps" in e else ""
                print(f"valid, dynamic ({e['rule']}) lr {e['lr']:g} decay {e['decay']:g}{eps}: ppl {e['ppl']:.2f} "
                      f"(plain {res['ppl']:.2f})", flush=True)
            chosen["dynamic"] = _best(out["dynamic_grid"])
        c, d = chosen.get("cache"), chosen.get("dynamic")
        test = evaluate(args.test,
                        cache=CacheSpec(c["size"], (c["theta"],), (c["lambda"],)) if c else None,
                        dynamic=DynamicSpec((d["lr"],), d["decay"], d["segment"], dynamic.rms_data,
                                            d.get("eps", RMS_EPS)) if d else None)
        out["seconds"] = time.perf_counter() - t0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.update(chosen=chosen, test_plain_ppl=test["ppl"], test_tokens=test["tokens"])
    print(f"test ({test['tokens']:,} tokens): plain ppl {test['ppl']:.2f}")
    if c:
        out["test_cache_ppl"] = test["cache"][0]["ppl"]
        print(f"  with the cache chosen on validation (size {c['size']}, θ={c['theta']:g}, λ={c['lambda']:g}): "
              f"{out['test_cache_ppl']:.2f}")
    if d:
        out["test_dynamic_ppl"] = test["dynamic"][0]["ppl"]
        print(f"  with dynamic evaluation chosen on validation ({d['rule']}, lr {d['lr']:g}, segment {d['segment']}, "
              + (f"ε {d['eps']:g}, " if "eps" in d else "") +
              f"decay {d['decay']:g}): {out['test_dynamic_ppl']:.2f}")
    if c and d:
        out["test_dynamic_cache_ppl"] = test["dynamic"][0]["cache"][0]["ppl"]
        print(f"  with both, each as chosen above (the cache over the adapting model): "
              f"{out['test_dynamic_cache_ppl']:.2f}")
    print(f"{out['seconds']:.0f} s in all")
    if args.json:
        out.update(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
