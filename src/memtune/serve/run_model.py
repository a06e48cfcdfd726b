"""Text from a run: `memtune generate RUN "prompt"` and `memtune chat RUN`.

A run directory (recipe.yaml + adapter/ or model/) is opened the way `memtune eval` opens it, then
generated through one of two paths:

  engine  the serving engine over the run's base in its storage (fp32, bf16, NF4, INT4): full
          fine-tuning (model/ is the base), a merged or quantized folder (adapter.kind=none), and the
          LoRA family (LoRA, DyLoRA at adapter.rank, AdaLoRA) as one adapter of the engine
  plain   transformers' `generate` on the model as memtune's evaluation builds it, for whatever the
          engine cannot serve: QST (a side network), prompt / prefix / P-Tuning v2 (virtual tokens),
          VeRA, QA-LoRA before merging (its A reads group-pooled inputs), LongLoRA with trained
          embeddings or norms, and architectures outside the engine's families (GPT-2, OPT)

`TextGenerator.path` and `.why` say which path runs and why; both take the same SamplingParams.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterator

import torch

from ..adapters.none import NoAdapterConfig
from ..errors import ConfigError, ModelError
from ..evaluate import recipe_for
from ..models import PRESETS
from ..pipeline import build_run
from ..recipe import build_recipe
from .engine import Engine, EngineConfig
from .sampling import SamplingParams, chat_template_prompt, stop_at

log = logging.getLogger(__name__)

ENGINE_ADAPTERS = ("lora", "dylora", "adalora", "longlora")  # PEFT LoRA-family files the engine reads
AS_BASE = ("full", "none")  # the run's artifact (or model) is the whole model


def target_recipe(target: str, overrides: list[str]):
    """(recipe, artifact) for a run directory or a recipe file, as `memtune eval` reads them; a model
    folder (config.json, e.g. a `memtune merge` output) or a preset is used as it is (adapter.kind=none)."""
    path = Path(target)
    is_model = (path.is_dir() and not (path / "recipe.yaml").is_file() and (path / "config.json").is_file()) \
        or target in PRESETS
    if is_model:
        return build_recipe({"model": target}, ["adapter.kind=none", *overrides]), None
    return recipe_for(target, overrides)


def engine_for(recipe, artifact: Path | None, config: EngineConfig | None,
               adapter_name: str = "run") -> tuple[Engine, str | None]:
    """The engine over a recipe's base in its storage, with the run's adapter (if any) registered as
    `adapter_name`. ModelError when the engine cannot serve it (then the plain path can)."""
    recipe = copy.deepcopy(recipe)
    kind = recipe.adapter.kind
    if kind not in AS_BASE and kind not in ENGINE_ADAPTERS:
        raise ModelError(f"adapter.kind={kind} is not a LoRA-family adapter the engine batches")
    if kind in AS_BASE:
        run = build_run(recipe, adapter_path=artifact if kind == "full" else None)
    else:
        path = artifact or recipe.adapter.path
        if path is None:
            raise ConfigError(f"adapter.kind={kind}: no trained adapter (pass a run directory or adapter.path)")
        rank = getattr(recipe.adapter, "rank", None) or None  # DyLoRA's serving rank
        recipe.adapter = NoAdapterConfig()
        recipe.attention = None  # LongLoRA's shifted attention is for training only
        run = build_run(recipe)
    engine = Engine(run.model, run.tokenizer, config)
    if kind in AS_BASE:
        return engine, None
    engine.add_adapter(adapter_name, path, rank=rank)
    return engine, adapter_name


class TextGenerator:
    def __init__(self, target: str, overrides: list[str] = (), config: EngineConfig | None = None,
                 prefer: str = "engine") -> None:
        """`prefer="plain"` skips the engine (to check one path against the other)."""
        recipe, artifact = target_recipe(target, list(overrides))
        if recipe.task != "causal-lm" or recipe.prompt is not None:
            raise ConfigError(f"{target}: task {recipe.task!r}{' with a prompt' if recipe.prompt else ''} does not "
                              f"generate text; generate and chat take causal-lm runs")
        self.recipe, self.artifact = recipe, artifact
        self.path, self.why, self.engine, self.adapter = "plain", "", None, None
        kind = recipe.adapter.kind
        if prefer == "plain":
            self.why = "the plain path was asked for"
        elif kind in AS_BASE or kind in ENGINE_ADAPTERS:
            try:
                self._open_engine(config)
            except ModelError as e:  # e.g. a family the engine does not run, modules_to_save in the file
                self.why = str(e)
                self.engine = None
        else:
            self.why = f"adapter.kind={kind} is not a LoRA-family adapter the engine batches"
        if self.engine is None:
            self.run = build_run(recipe, adapter_path=artifact)
            self.tokenizer = self.run.tokenizer
            self.run.model.eval()
        if self.why:
            log.info("generating through the plain path: %s", self.why)

    def _open_engine(self, config: EngineConfig | None) -> None:
        self.engine, self.adapter = engine_for(self.recipe, self.artifact, config)
        self.tokenizer = self.engine.tokenizer
        self.path = "engine"

    # -- generation --------------------------------------------------------------------------------
    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Text as it is produced (stop strings and EOS end it)."""
        params.check()
        if self.engine is not None:
            req = self.engine.add_request(prompt, self.adapter, params)
            while req.status != "finished":
                for ev in self.engine.step():
                    if ev.request is req and ev.text:
                        yield ev.text
            return
        yield from self._plain(prompt, params)

    def generate(self, prompt: str, params: SamplingParams) -> str:
        return "".join(self.stream(prompt, params))

    def _plain(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        run, tok = self.run, self.tokenizer
        enc = tok(prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=params.max_tokens, pad_token_id=tok.pad_token_id)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                          top_p=params.top_p)
        else:
            kwargs.update(do_sample=False)
        eos = [] if params.ignore_eos else [i for i in (tok.eos_token_id, *params.stop_token_ids) if i is not None]
        kwargs["eos_token_id"] = eos or None
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.no_grad(), run.forward_ctx()():
            out = run.model.generate(input_ids=enc["input_ids"].to(run.device),
                                     attention_mask=enc["attention_mask"].to(run.device), **kwargs)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        cut = stop_at(text, params.stop)
        yield text if cut is None else text[:cut]

    # -- chat --------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The prompt for a conversation and the token ids that end a turn. The tokenizer's chat template
        when it has one; otherwise plain 'User:' / 'Assistant:' turns (stated once in the CLI)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return chat_template_prompt(tok, messages)
        lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:", []


def chat_loop(gen: TextGenerator, params: SamplingParams, read=input, write=print) -> int:
    """Interactive: each line is a user turn, the reply streams; /reset clears, /exit or EOF ends."""
    messages: list[dict] = []
    if not getattr(gen.tokenizer, "chat_template", None):
        write("(the tokenizer has no chat template: plain 'User:' / 'Assistant:' turns)")
    while True:
        try:
            line = read("> ")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt, ends = gen.chat_prompt(messages)
        turn = copy.copy(params)
        turn.stop_token_ids = [*params.stop_token_ids, *ends]
        if not ends:
            turn.stop = [*params.stop, "\nUser:"]
        reply = ""
        for piece in gen.stream(prompt, turn):
            reply += piece
            write(piece, end="", flush=True)
        write("")
        messages.append({"role": "assistant", "content": reply})

