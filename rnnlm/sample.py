"""Sampling text from a trained model.

One forward step per new token with the hidden state carried (O(1) work per token, the
prefix is never re-run). The distribution at each step is processed in this order:

1. ``<unk>`` removed (unless ``allow_unk``): its probability is set to 0 and the rest
   renormalised -- exactly the distribution of re-drawing until a non-UNK token comes up;
2. temperature (0 means greedy);
3. top-k, then top-p (nucleus: the smallest set of tokens whose mass reaches p);
4. a draw from a seeded generator, so ``seed`` makes output reproducible.

A sample ends at ``<eos>`` (not printed) or after ``max_length`` tokens. Bidirectional
models sample with their forward direction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UsageError
from .text import EOS, EOS_ID, UNK_ID, Tokenizer, Vocab


@dataclass
class Sample:
    text: str           # prime + generated text
    generated: str      # the generated continuation alone
    tokens: int         # generated tokens (EOS not counted)
    stop: str           # "eos" or "length"

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stop": self.stop, "generated": self.generated}


def filter_log_probs(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     allow_unk: bool = False) -> torch.Tensor:
    """Turn log-probabilities (B, V) into the log-probabilities actually sampled from (B, V).

    Removed tokens get -inf; the rest is renormalised. temperature must be > 0 here.
    """
    logp = logp.float().clone()
    if not allow_unk:
        logp[:, UNK_ID] = float("-inf")
    logp = torch.log_softmax(logp / temperature, dim=-1)
    V = logp.size(-1)
    if 0 < top_k < V:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]          # (B, 1)
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, idx = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_lp.exp()
        mass_before = probs.cumsum(-1) - probs                          # mass of strictly better tokens
        drop_sorted = mass_before >= top_p                              # keep until the mass reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logp, dim=-1)


class Sampler:
    """Draws samples from an RNNLM (the forward direction)."""

    def __init__(self, model, vocab: Vocab, tokenizer: Tokenizer, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.vocab = vocab
        self.tok = tokenizer
        self.device = torch.device(device)

    def encode_prime(self, prime: str) -> tuple[list[int], int]:
        """Context ids for a prime text (start context <eos> first) and how many became <unk>."""
        if not prime:
            return [EOS_ID], 0
        tokens = self.tok.tokenize(prime)
        # The prime continues: no EOS after it unless it ends a unit explicitly.
        if tokens and tokens[-1] == EOS and not (self.tok.eos == "line" and prime.endswith("\n")) \
                and not (self.tok.eos == "paragraph" and prime.endswith("\n\n")):
            tokens.pop()
        ids = self.vocab.encode(tokens)
        unknown = sum(1 for t, i in zip(tokens, ids) if i == UNK_ID and t != "<unk>")
        return [EOS_ID] + ids, unknown

    @torch.no_grad()
    def generate(self, prime: str = "", num_samples: int = 1, max_length: int = 500, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False, allow_unk: bool = False,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> list[Sample]:
        """Generate `num_samples` continuations of `prime` in one batch.

        on_text, if given (single sample), receives each new piece of text as it is generated.
        """
        if temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {top_k}")
        if not 0 < top_p <= 1:
            raise UsageError(f"--top-p must lie in (0, 1], got {top_p}")
        if max_length < 0 or num_samples < 0:
            raise UsageError("--max-length and --num-samples must be >= 0")
        if num_samples == 0:
            return []
        greedy = greedy or temperature == 0
        context, unknown = self.encode_prime(prime)
        if unknown:
            warnings.warn(f"{unknown} prime token(s) are not in the vocabulary and are fed as <unk>", stacklevel=2)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
        B = num_samples
        x = torch.tensor(context, dtype=torch.long, device=self.device).unsqueeze(1).expand(-1, B).contiguous()
        h, state = self.model(x, None, 0)
        h = h[-1]                                                         # (B, D)
        out = [[] for _ in range(B)]
        stop = ["length"] * B
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for _ in range(max_length):
            logp = self.model.log_probs(h)                                # (B, V)
            if greedy:
                if not allow_unk:
                    logp[:, UNK_ID] = float("-inf")
                nxt = logp.argmax(-1)
            else:
                lp = filter_log_probs(logp, temperature, top_k, top_p, allow_unk)
                nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
            ids = nxt.tolist()
            for b, i in enumerate(ids):
                if done[b]:
                    continue
                if i == EOS_ID:
                    done[b] = True
                    stop[b] = "eos"
                else:
                    out[b].append(i)
                    if on_text is not None and B == 1:
                        on_text(self._piece(out[b], prime))
            if bool(done.all()):
                break
            h, state = self.model(nxt.unsqueeze(0), state, 0)
            h = h[-1]
        samples = []
        for b in range(B):
            generated = self.tok.detokenize(self.vocab.decode(out[b]))
            samples.append(Sample(self._join(prime, generated), generated, len(out[b]), stop[b]))
        return samples

    def _piece(self, ids: list[int], prime: str) -> str:
        """Text added by the newest token (for streaming after the prime was printed)."""
        tok = self.vocab.itos[ids[-1]]
        if self.tok.level == "char":
            return tok
        first = len(ids) == 1
        return ("" if first and (not prime or prime[-1:].isspace()) else " ") + tok

    def _join(self, prime: str, generated: str) -> str:
        if not prime:
            return generated
        if self.tok.level == "word" and generated and not prime[-1:].isspace():
            return prime + " " + generated
        return prime + generated
