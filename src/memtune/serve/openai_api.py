"""The OpenAI API's request and response shapes, checked field by field.

Requests are validated here before anything reaches the engine: a wrong type or range is a 400
naming the field (OpenAI's error body: {"error": {"message", "type", "param", "code"}}); a field the
API defines but the engine cannot honour (n > 1, logprobs, tools, ...) is a 400 naming it; fields
the API does not define are ignored, as OpenAI's server does, so clients that send extras work.
`top_k` and `ignore_eos` are accepted as vLLM and SGLang accept them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


@dataclass
class Parsed:
    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict] | None  # chat
    params: SamplingParams
    stream: bool
    include_usage: bool


# fields of the API the engine does not implement, with the value(s) that mean "off"
UNSUPPORTED_COMMON = {"n": (None, 1), "logprobs": (None, False), "logit_bias": (None, {}),
                      "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}
UNSUPPORTED_COMPLETIONS = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, "")}
UNSUPPORTED_CHAT = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                    "function_call": (None, "none"), "top_logprobs": (None, 0), "audio": (None,),
                    "response_format": (None, {"type": "text"}), "prediction": (None,), "modalities": (None, ["text"])}


def _typed(body: dict, name: str, types: tuple, what: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise bad(name, f"expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise bad(name, f"expected {what}, got {type(value).__name__} {value!r}"[:200])
    return value


def _unsupported(body: dict, table: dict) -> None:
    for name, off in table.items():
        if name in body and body[name] not in off:
            raise bad(name, f"not supported by this server (only {off[-1]!r} or absent)")


def parse(body: Any, chat: bool, max_tokens_limit: int) -> Parsed:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _typed(body, "model", (str,), "a string (the base model or an adapter name)")
    if not model:
        raise bad("model", "required")
    _unsupported(body, UNSUPPORTED_COMMON)
    _unsupported(body, UNSUPPORTED_CHAT if chat else UNSUPPORTED_COMPLETIONS)
    prompt = messages = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "expected a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise bad(f"messages[{i}]", "expected an object with role system, user or assistant")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise bad(f"messages[{i}].content", "only text parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content", "expected a string")
            messages[i] = {"role": m["role"], "content": content}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
                raise bad("prompt", "expected a string or a list of token ids (several prompts per request are "
                                    "not supported)")
        elif not isinstance(prompt, str) or not prompt:
            raise bad("prompt", "expected a non-empty string")
        max_tokens, max_name = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = 16 if not chat else min(256, max_tokens_limit)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise bad(max_name, f"expected an integer, got {max_tokens!r}")
    if not 1 <= max_tokens <= max_tokens_limit:
        raise bad(max_name, f"expected 1..{max_tokens_limit}, got {max_tokens}")
    temperature = float(_typed(body, "temperature", (int, float), "a number", 1.0))
    if not 0 <= temperature <= 2:
        raise bad("temperature", f"expected 0..2, got {temperature}")
    top_p = float(_typed(body, "top_p", (int, float), "a number", 1.0))
    if not 0 < top_p <= 1:
        raise bad("top_p", f"expected 0 < top_p <= 1, got {top_p}")
    top_k = _typed(body, "top_k", (int,), "an integer", 0)
    if top_k < 0 and top_k != -1:
        raise bad("top_k", f"expected >= 0 (or -1 = off), got {top_k}")
    seed = _typed(body, "seed", (int,), "an integer")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", "expected a string or a list of up to 16 non-empty strings")
    stream = _typed(body, "stream", (bool,), "true or false", False)
    options = _typed(body, "stream_options", (dict,), "an object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", "expected true or false")
    ignore_eos = _typed(body, "ignore_eos", (bool,), "true or false", False)
    # OpenAI's default temperature is 1 (sampling); temperature 0 is greedy here as everywhere
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                            seed=seed, stop=stop or [], ignore_eos=ignore_eos)
    return Parsed(model, prompt, messages, params, stream, include_usage)


# -- responses -----------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, chat: bool, text: str, finish: str | None, use: dict | None) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if use is not None:
        out["usage"] = use
    return out


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False,
          use: dict | None = None) -> dict:
    """One streamed chunk; text None with `use`: the usage-only last chunk (choices empty)."""
    if text is None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
