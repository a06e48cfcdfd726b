"""Shapes of the models people plan for, so `memtune plan model=llama-2-70b` needs no download.

Each entry is the architecture fields of the model's hub `config.json` (the hub id is named beside
it); nothing else of the model is needed to plan, since a plan builds the model from its config on
tensors without data. `gpt3-175b` is GPT-3's published shape (Brown et al. 2020, Table 2.1: 96 layers,
d_model 12288, 96 heads, context 2048) in GPT-2's architecture, which GPT-3 shares (for the LoRA
paper's 175B figures).

dtype: the hub configs' own, except Llama-2 and LLaMA-1 (float16 there): bfloat16, the dtype they are
trained in today (with bf16 autocast, fp16 weights would also fail on the CPU the plan runs on). Set
`quantize.dtype=fp16` (plain storage) to plan fp16 weights.
"""

from __future__ import annotations

_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000,
               eos_token_id=128001, dtype="bfloat16")
_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
            activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2, dtype="float16")


def _llama(base: dict, d: int, ffn: int, layers: int, heads: int, kv: int, **extra) -> dict:
    return {**base, "hidden_size": d, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, **extra}


def _opt(d: int, layers: int, heads: int) -> dict:
    return {**_OPT, "hidden_size": d, "ffn_dim": 4 * d, "word_embed_proj_dim": d, "num_hidden_layers": layers,
            "num_attention_heads": heads}


# name -> (hub id, config.json fields)
CATALOGUE: dict[str, tuple[str, dict]] = {
    "tinyllama-1.1b": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
                       _llama({**_LLAMA2, "max_position_embeddings": 2048, "dtype": "float32"},
                              2048, 5632, 22, 32, 4)),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", _llama(_LLAMA2, 4096, 11008, 32, 32, 32)),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", _llama(_LLAMA2, 5120, 13824, 40, 40, 40)),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", _llama(_LLAMA2, 8192, 28672, 80, 64, 8)),
    "llama-65b": ("huggyllama/llama-65b", _llama({**_LLAMA2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
                                                8192, 22016, 80, 64, 64)),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", _llama(_LLAMA3, 4096, 14336, 32, 32, 8)),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", _llama(_LLAMA3, 8192, 28672, 80, 64, 8)),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1",
                   {**_llama(_LLAMA2, 4096, 14336, 32, 32, 8), "model_type": "mistral",
                    "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
                    "dtype": "bfloat16"}),
    "opt-1.3b": ("facebook/opt-1.3b", _opt(2048, 24, 32)),
    "opt-2.7b": ("facebook/opt-2.7b", _opt(2560, 32, 32)),
    "opt-6.7b": ("facebook/opt-6.7b", _opt(4096, 32, 32)),
    "opt-13b": ("facebook/opt-13b", _opt(5120, 40, 40)),
    "opt-30b": ("facebook/opt-30b", _opt(7168, 48, 56)),
    "opt-66b": ("facebook/opt-66b", _opt(9216, 64, 72)),
    "gpt3-175b": ("(GPT-3 175B shape)", dict(model_type="gpt2", vocab_size=50257, n_positions=2048, n_embd=12288,
                                             n_layer=96, n_head=96, bos_token_id=50256, eos_token_id=50256,
                                             dtype="float16")),
}
HUB_IDS = {hub.lower(): name for name, (hub, _) in CATALOGUE.items()}


def lookup(name: str) -> dict | None:
    """config.json fields of a catalogue name or of the hub id it stands for (case-insensitive)."""
    key = name.lower()
    key = HUB_IDS.get(key, key)
    entry = CATALOGUE.get(key)
    return dict(entry[1]) if entry is not None else None
