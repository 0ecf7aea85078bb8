"""Tune the continuous cache on validation text, then report the test perplexity with it.

The honest protocol of Grave et al. (2017): the cache size, θ and λ are chosen on the validation
text only; the test text is evaluated once, with the chosen values, next to the plain number.
For each cache size the model runs over the validation text once (`rnnlm eval-perplexity
--cache-size N --cache-theta ... --cache-lambda ...` does the same for one size) and every
(θ, λ) of the grid is scored from the stored features.

usage: python scripts/cache_tune.py --checkpoint RUN_DIR --valid VALID.txt --test TEST.txt
                                    [--sizes 100,500,2000] [--thetas 0.1,...] [--lambdas 0.05,...]
                                    [--batch-size 16] [--device auto] [--json OUT.json]
prints: the best (θ, λ) per size on validation, the chosen one, and the test perplexity without
        and with the cache
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from rnnlm.cache import CacheSpec, parse_values
from rnnlm.checkpoint import load_model
from rnnlm.errors import UsageError
from rnnlm.evaluate import perplexity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", "-m", required=True, help="run directory (its best.pt) or a checkpoint")
    ap.add_argument("--valid", required=True, help="validation text: the values are chosen on it")
    ap.add_argument("--test", required=True, help="test text: evaluated once with the chosen values")
    ap.add_argument("--sizes", default="100,500,2000")
    ap.add_argument("--thetas", default="0.1,0.3,0.5,1,2,3,5")
    ap.add_argument("--lambdas", default="0.05,0.1,0.15,0.2,0.3,0.4,0.5")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in parse_values(args.sizes, "--sizes")]
        thetas, lambdas = parse_values(args.thetas, "--thetas"), parse_values(args.lambdas, "--lambdas")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
        lm = load_model(args.checkpoint, device)
        enc, errors = lm.config.data.encoding, lm.config.data.errors

        def evaluate(path, spec):
            return perplexity(lm.model, lm.vocab, lm.tokenizer, path, args.batch_size, device, enc, errors,
                              cache=spec)
        t0 = time.perf_counter()
        per_size = []
        for size in sizes:
            res = evaluate(args.valid, CacheSpec(size, thetas, lambdas))
            best = min(res["cache"], key=lambda e: e["loss"])
            per_size.append({"size": size, "valid_ppl": res["ppl"], "best": best, "grid": res["cache"]})
            print(f"valid, cache {size:>5}: best θ={best['theta']:g} λ={best['lambda']:g} "
                  f"ppl {best['ppl']:.2f} (plain {res['ppl']:.2f})", flush=True)
        chosen = min(per_size, key=lambda r: r["best"]["loss"])["best"]
        test = evaluate(args.test, CacheSpec(chosen["size"], (chosen["theta"],), (chosen["lambda"],)))
        seconds = time.perf_counter() - t0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"chosen on validation: size {chosen['size']}, θ={chosen['theta']:g}, λ={chosen['lambda']:g}")
    print(f"test: plain ppl {test['ppl']:.2f}, with the cache {test['cache'][0]['ppl']:.2f} "
          f"({test['tokens']:,} tokens; {seconds:.0f} s in all)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "valid": args.valid, "test": args.test,
                       "per_size": per_size, "chosen": chosen, "test_plain_ppl": test["ppl"],
                       "test_cache_ppl": test["cache"][0]["ppl"], "seconds": seconds,
                       "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
