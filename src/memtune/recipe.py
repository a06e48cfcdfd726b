"""The recipe: one typed config per run, loaded from YAML plus dotted `key=value` overrides.

A recipe has orthogonal axes, each a section whose `kind` picks a registered implementation:

    quantize   how the frozen base is stored        (registry `memtune.storage.STORAGE`)
    adapter    what trains                          (registry `memtune.adapters.ADAPTERS`)
    optimizer  how an update is computed/applied    (registry `memtune.gradient.OPTIMIZERS`)

The concrete dataclass of a section comes from its registry, so a new method brings its own typed
config and this file does not change. Parsing checks every key and type and names the offending
field (`adapter.r: expected an integer, got 'abc'`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


# ----------------------------------------------------------------------------------------------
# Section base classes. Methods subclass these with their own fields.


@dataclass
class SectionConfig:
    """A recipe section whose `kind` selects a registered implementation."""

    kind: str = ""

    def check(self, prefix: str) -> None:
        """Raise ConfigError for values that parse but make no sense. Override per method."""


@dataclass
class StorageConfig(SectionConfig):
    """`quantize:` section: how the frozen base weights are stored (`none` keeps them as loaded)."""

    kind: str = "none"


@dataclass
class AdapterConfig(SectionConfig):
    """`adapter:` section: what trains. `full` trains every parameter."""

    kind: str = "full"
    path: str | None = None  # start from (or evaluate) an existing adapter directory


@dataclass
class OptimizerConfig(SectionConfig):
    """`optimizer:` section: how updates are computed and applied."""

    kind: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0

    def check(self, prefix: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr: expected a positive learning rate, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay: expected >= 0, got {self.weight_decay}")


# ----------------------------------------------------------------------------------------------
# Fixed sections.

DATA_FORMATS = ("auto", "text", "alpaca", "messages", "classification")


@dataclass
class DataConfig:
    train: str | None = None  # local .jsonl/.json/.csv/.tsv file, or a hub dataset name
    eval: str | None = None
    format: Literal["auto", "text", "alpaca", "messages", "classification"] = "auto"
    max_length: int = 512
    labels: list[str] | None = None  # class names in id order; inferred from training data if absent
    split: str = "train"  # split name for hub datasets
    eval_split: str = "validation"


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    eval_at_start: bool = False  # also evaluate before the first step (summary: eval_start)
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    gradient_checkpointing: bool = False
    # causal LM: the loss through the output head a chunk of positions at a time (no (N, V) logits;
    # memtune.linear_ce), where the model's logits are its head on its last hidden state
    chunked_ce: bool = True
    tensorboard: bool = False
    progress: bool = True
    measure_memory_steps: int = 3  # optimizer steps measured by the memory tracker (0 = off)
    eval_batch_size: int = 0  # 0 = batch_size
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class Recipe:
    model: str = "tiny-llama"
    task: Literal["causal-lm", "classification"] = "causal-lm"
    # classification: the feature the head reads; model = the model's own (BERT: [CLS] pooler, decoders:
    # last token), mean = masked mean of the last hidden states (sentence encoders; memtune.pooling)
    pooling: Literal["model", "mean"] = "model"
    data: DataConfig = field(default_factory=DataConfig)
    quantize: StorageConfig = field(default_factory=StorageConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokentune: Any = None  # gradient-axis option: backprop through k selected tokens (see OPTIONAL)
    prompt: Any = None  # classification through an LM head: template + label words (memtune.prompting)
    classifier_init: Any = None  # classification head from class centroids (memtune.classifier_init)
    attention: Any = None  # attention axis: dense | s2 (LongLoRA's shifted sparse attention; memtune.attention)
    distributed: Any = None  # over several processes: ddp | fsdp (memtune.distributed); ranks come from the launcher
    output_dir: str = "runs/latest"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sections whose dataclass is chosen by `kind` through a registry (filled in by memtune.methods).
POLYMORPHIC: dict[str, Any] = {}
# Optional sections (absent or null = off) and their dataclass (filled in by memtune.methods).
OPTIONAL: dict[str, type] = {}


# ----------------------------------------------------------------------------------------------
# Parsing.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few lossless cases YAML leaves open."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # `targets=q_proj` means a one-element list
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, name)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise bad


def parse_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted name."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        which = f" for {prefix}.kind '{raw['kind']}'" if prefix in POLYMORPHIC and "kind" in raw else ""
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key{which} "
            f"(expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        if prefix == "" and key in POLYMORPHIC:
            kwargs[key] = _parse_polymorphic(key, value)
        elif prefix == "" and key in OPTIONAL:
            kwargs[key] = None if value is None else parse_section(OPTIONAL[key], value, key)
            if kwargs[key] is not None:
                kwargs[key].check(key)
        else:
            kwargs[key] = _coerce(value, hints[key], name)
    obj = cls(**kwargs)
    for key in POLYMORPHIC if prefix == "" else ():
        if key not in raw:  # default section: still resolved through its registry
            setattr(obj, key, _parse_polymorphic(key, {}))
    return obj


def _parse_polymorphic(section: str, raw: Any) -> SectionConfig:
    registry, base = POLYMORPHIC[section]
    if raw is None:
        raw = {}
    if isinstance(raw, str):  # `adapter: lora` is short for `adapter: {kind: lora}`
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping with a 'kind' key, got {raw!r}")
    kind = raw.get("kind", base().kind)
    if not isinstance(kind, str):
        raise ConfigError(f"{section}.kind: expected a string, got {kind!r}")
    cls = registry.config_class(kind, f"{section}.kind")
    cfg = parse_section(cls, {**raw, "kind": kind}, section)
    cfg.check(section)
    return cfg


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """raw['a']['b'] = value for 'a.b', creating mappings on the way."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if isinstance(nxt, str) and part in POLYMORPHIC and i == 0:
            nxt = {"kind": nxt}
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is {nxt!r}, cannot set '{dotted}' inside it")
        node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'adapter.targets=[q_proj,v_proj]' -> ('adapter.targets', ['q_proj', 'v_proj'])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value (e.g. train.max_steps=50)")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {str(e).splitlines()[0]}") from None
    return key, parsed


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of recipe keys at the top level")
    return raw


def build_recipe(raw: dict[str, Any], overrides: list[str] = (), source: str | None = None) -> Recipe:
    """Raw mapping (from YAML) + overrides -> validated Recipe."""
    from . import methods  # noqa: F401  (registers every axis value)

    raw = _deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    from .methods import apply_axis_defaults
    from .stored import apply_recorded

    try:
        apply_recorded(raw)  # a model folder that records its storage (and use) fills those keys
        apply_axis_defaults(raw)
        recipe = parse_section(Recipe, raw, "")
    except ConfigError as e:
        if source:
            raise ConfigError(f"{source}: {e}") from None
        raise
    check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    raw = load_yaml(path) if path else {}
    return build_recipe(raw, overrides, source=str(path) if path else None)


def check_recipe(r: Recipe) -> None:
    """Cross-field checks: values that parse but cannot work together."""
    t = r.train
    positive = {"data.max_length": r.data.max_length, "train.batch_size": t.batch_size,
                "train.grad_accum": t.grad_accum, "train.log_every": t.log_every}
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {v}")
    non_negative = {"train.max_steps": t.max_steps, "train.warmup_steps": t.warmup_steps,
                    "train.eval_every": t.eval_every, "train.save_every": t.save_every,
                    "train.measure_memory_steps": t.measure_memory_steps,
                    "train.eval_batch_size": t.eval_batch_size, "train.max_grad_norm": t.max_grad_norm}
    for name, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{name}: expected >= 0, got {v}")
    if t.epochs <= 0 and t.max_steps == 0:
        raise ConfigError("train.epochs: expected > 0 (or set train.max_steps)")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints: expected >= 1, got {t.keep_checkpoints}")
    if r.data.labels is not None and len(set(r.data.labels)) != len(r.data.labels):
        raise ConfigError(f"data.labels: names must be distinct, got {r.data.labels}")
    if r.data.labels is not None and len(r.data.labels) < 2:
        raise ConfigError(f"data.labels: expected at least 2 class names, got {r.data.labels}")
    from .methods import check_combination

    check_combination(r)


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def recipe_to_yaml(r: Recipe) -> str:
    return yaml.safe_dump(r.to_dict(), sort_keys=False)
