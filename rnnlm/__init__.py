"""rnnlm: train, sample from and evaluate recurrent language models.

Everything the CLI does is reachable from Python::

    from rnnlm import Config, Vocab, Tokenizer, RNNLM, Trainer, Sampler, perplexity

The names are imported on first use (PEP 562), so ``import rnnlm`` -- and ``rnnlm --help`` --
does not pay for importing PyTorch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config", "build_config": "config",
    "RnnlmError": "errors", "RunError": "errors", "UsageError": "errors",
    "Tokenizer": "text", "Vocab": "text",
    "RNNLM": "models",
    "load_model": "checkpoint",
    "perplexity": "evaluate", "score_sentences": "evaluate", "CacheSpec": "cache", "DynamicSpec": "dynamic",
    "Sampler": "sample",
    "Trainer": "train",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rnnlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
