"""Per-request sampling: greedy, temperature, top-k, top-p, a seed of its own, stop strings.

Logits are processed in transformers' order (temperature, then top-k, then top-p), and a token is
drawn with the request's own torch.Generator, so a seeded request gives the same text whatever else
shares its batch. temperature 0 is greedy (argmax; top-k / top-p do not apply).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: drawn from the engine's generator
    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence of any
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end generation like EOS (e.g. <|im_end|>)
    ignore_eos: bool = False  # keep generating past EOS and stop_token_ids (benchmarks)

    def check(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens: expected >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop: expected non-empty strings, got {self.stop!r}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits (V,) (fp32)."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the lowest tokens whose cumulative mass is <= 1 - top_p
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - params.top_p
        drop[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_at(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could begin a stop string: not streamed yet."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>")  # ChatML, Llama 3, Phi-3


def chat_template_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The tokenizer's chat template applied for the next assistant turn, and the ids of the
    turn-ending tokens its vocabulary has (they stop generation like EOS)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    vocab = tokenizer.get_vocab()
    return text, [tokenizer.convert_tokens_to_ids(t) for t in TURN_ENDS if t in vocab]
