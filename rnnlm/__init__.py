"""rnnlm: train, sample from and evaluate recurrent language models.

Everything the CLI does is reachable from Python::

    from rnnlm import Config, Vocab, Tokenizer, RNNLM, Trainer, Sampler, perplexity
"""

__version__ = "0.1.0"

from .config import Config, build_config  # noqa: E402
from .errors import RnnlmError, RunError, UsageError  # noqa: E402
from .text import Tokenizer, Vocab  # noqa: E402
from .models import RNNLM  # noqa: E402
from .checkpoint import load_model  # noqa: E402
from .evaluate import perplexity, score_sentences  # noqa: E402
from .sample import Sampler  # noqa: E402
from .train import Trainer  # noqa: E402

__all__ = ["__version__", "Config", "build_config", "RnnlmError", "RunError", "UsageError", "Tokenizer", "Vocab",
           "RNNLM", "load_model", "perplexity", "score_sentences", "Sampler", "Trainer"]
