"""Dataset formats -> token ids with a loss mask.

    text            {"text"}                                  loss on every token
    alpaca          {"instruction", "input"?, "output", "system"?}   loss on the response only
    messages        {"messages": [{"role", "content"}, ...]}  loss on assistant turns only
    classification  {"text"|"sentence", "text_pair"?, "label"}  one label per example

Causal-LM examples are {"input_ids", "labels"} with labels = -100 where no loss is taken; the
trainer shifts labels by one. Classification examples are {"input_ids", "token_type_ids"?, "label"}.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import DataError
from .readers import Record

IGNORE = -100

TEXT_KEYS = ("text", "sentence", "sentence1", "content", "review")
PAIR_KEYS = ("text_pair", "sentence2")
LABEL_KEYS = ("label", "labels")

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task{with_input}. "
                   "Write a response that appropriately completes the request.\n\n")

CAUSAL_FORMATS = ("text", "alpaca", "messages")


def _first_key(fields: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in fields), None)


def detect_format(records: list[Record], task: str, source: str) -> str:
    fields = records[0].fields
    if task == "classification":
        return "classification"
    if "messages" in fields:
        return "messages"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if "text" in fields:
        return "text"
    raise DataError(f"{source}: cannot tell the data format from columns {sorted(fields)} (expected 'text', "
                    f"'instruction'+'output', or 'messages'); set data.format")


def check_format_task(fmt: str, task: str) -> None:
    if task == "classification" and fmt != "classification":
        raise DataError(f"data.format '{fmt}' is a language-modelling format; task 'classification' needs "
                        f"data.format=classification")
    if task == "causal-lm" and fmt == "classification":
        raise DataError("data.format 'classification' needs task=classification")


def _need_str(rec: Record, key: str, optional: bool = False) -> str | None:
    v = rec.fields.get(key)
    if v is None:
        if optional:
            return None
        raise DataError(f"{rec.where}: missing field '{key}' (have: {', '.join(sorted(rec.fields))})")
    if not isinstance(v, str):
        raise DataError(f"{rec.where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else []


def _eos(tok) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def text_example(rec: Record, tok, max_length: int) -> dict:
    ids = (_bos(tok) + _encode(tok, _need_str(rec, "text")) + _eos(tok))[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def alpaca_prompt(instruction: str, inp: str | None, system: str | None = None) -> str:
    if inp:
        body = ALPACA_TEMPLATE_INPUT.format(instruction=instruction, input=inp)
    else:
        body = ALPACA_TEMPLATE.format(instruction=instruction)
    head = system + "\n\n" if system else ALPACA_PREAMBLE.format(with_input=", paired with an input" if inp else "")
    return head + body


def alpaca_example(rec: Record, tok, max_length: int) -> dict:
    prompt = alpaca_prompt(_need_str(rec, "instruction"), _need_str(rec, "input", True),
                           _need_str(rec, "system", True))
    p_ids = _bos(tok) + _encode(tok, prompt)
    r_ids = _encode(tok, _need_str(rec, "output")) + _eos(tok)
    ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def _render(tok, messages: list[dict], gen: bool) -> str:
    from ..models import CHATML_TEMPLATE

    template = tok.chat_template or CHATML_TEMPLATE
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def messages_example(rec: Record, tok, max_length: int) -> dict:
    """Loss on assistant turns only.

    The conversation is rendered once with the tokenizer's chat template. Each assistant turn's
    character span is [len(render(turns before, add_generation_prompt)), len(render(turns up to it)));
    tokens (from the fast tokenizer's offsets) lying inside a span get labels, others -100.
    """
    msgs = rec.fields.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{rec.where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{rec.where}: messages[{j}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{rec.where}: messages[{j}].role '{m['role']}' (expected system, user, assistant "
                            f"or tool)")
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{rec.where}: no assistant turn, so nothing to learn from")
    full = _render(tok, clean, gen=False)
    spans = []
    for j, m in enumerate(clean):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, clean[:j], gen=True)) if j else 0
        end = len(_render(tok, clean[: j + 1], gen=False))
        if not full.startswith(_render(tok, clean[: j + 1], gen=False)):
            raise DataError(f"{rec.where}: the tokenizer's chat template does not render conversations "
                            f"prefix-consistently, so assistant turns cannot be masked")
        spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if any(s <= a and b <= e and b > a for s, e in spans):
            labels[i] = ids[i]
    if _bos(tok) and (not ids or ids[0] != tok.bos_token_id) and not full.startswith(tok.bos_token or "\0"):
        ids, labels = _bos(tok) + ids, [IGNORE] + labels
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class LabelMap:
    """Class names in id order; data labels may be names or integer ids."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}

    def id_of(self, value: Any, where: str) -> int:
        key = str(value).strip() if not isinstance(value, bool) else None
        if key is not None and key in self.index:
            return self.index[key]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            i = int(value)
            if 0 <= i < len(self.names) and not any(n.lstrip("-").isdigit() for n in self.names):
                return i
        raise DataError(f"{where}: unknown label {value!r} (expected one of: {', '.join(self.names)}"
                        f"{' or an id 0..' + str(len(self.names) - 1) if self.names else ''})")


def infer_labels(records: list[Record], source: str) -> list[str]:
    """Label names from training data: integer labels 0..K-1 keep their order; names sort."""
    values = []
    for r in records:
        key = _first_key(r.fields, LABEL_KEYS)
        if key is None:
            raise DataError(f"{r.where}: missing field 'label' (have: {', '.join(sorted(r.fields))})")
        v = r.fields[key]
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise DataError(f"{r.where}: field '{key}' must be a string or an integer, got {v!r}")
        values.append(str(v).strip())
    distinct = set(values)
    if all(v.lstrip("-").isdigit() for v in distinct):
        names = sorted(distinct, key=int)
    else:
        names = sorted(distinct)
    if len(names) < 2:
        raise DataError(f"{source}: classification needs at least 2 distinct labels, found {names}")
    return names


def classification_example(rec: Record, tok, max_length: int, labels: LabelMap,
                           encode: Callable[[str, str | None, str], dict] | None = None) -> dict:
    """`encode(text, text_pair, where)` -> token fields replaces the tokenizer's own (truncating)
    pair encoding, e.g. to render a prompt template (memtune.prompting)."""
    tkey = _first_key(rec.fields, TEXT_KEYS)
    if tkey is None:
        raise DataError(f"{rec.where}: missing text field (expected one of: {', '.join(TEXT_KEYS)}; "
                        f"have: {', '.join(sorted(rec.fields))})")
    lkey = _first_key(rec.fields, LABEL_KEYS)
    if lkey is None:
        raise DataError(f"{rec.where}: missing field 'label' (have: {', '.join(sorted(rec.fields))})")
    text = _need_str(rec, tkey)
    pkey = _first_key(rec.fields, PAIR_KEYS)
    pair = _need_str(rec, pkey) if pkey else None
    label = labels.id_of(rec.fields[lkey], rec.where)
    if encode is not None:
        return {**encode(text, pair, rec.where), "label": label}
    enc = tok(text, pair, truncation=True, max_length=max_length)
    ex = {"input_ids": list(enc["input_ids"]), "label": label}
    if "token_type_ids" in enc:
        ex["token_type_ids"] = list(enc["token_type_ids"])
    return ex


BUILDERS = {"text": text_example, "alpaca": alpaca_example, "messages": messages_example}
