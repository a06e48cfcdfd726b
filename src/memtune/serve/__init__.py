"""Generation and multi-adapter serving (S-LoRA): one base model, LoRA adapters as data, paged KV.

    engine.py          the engine: one packed forward per step, sampling, streaming events
    scheduler.py       iteration-level batching, admission under one page budget, preemption
    pool.py            the page pool shared by KV pages and resident adapters
    adapter_cache.py   host store + LRU of device-resident adapters, pinned while in use
    adapters.py        PEFT-format LoRA / DyLoRA / AdaLoRA directories read and checked
    lora_kernels.py    heterogeneous-rank LoRA: sorted segments, rank-bucketed gather (BGMV)
    native_lora.py     the segment loop in C++ on the CPU (csrc/sgmv_cpu.cpp, built on first use)
    batched_lora.py    the wrapped linear layer that applies them
    paged_attention.py attention over pages, registered with transformers
    sampling.py        greedy / temperature / top-k / top-p / seeds / stop strings
    run_model.py       `memtune generate` / `memtune chat` from a run (engine or plain transformers)
    engine_thread.py   the engine on a thread, fed from asyncio
    engine_process.py  the engine in a child process (what `memtune serve` runs), same interface
    openai_api.py      OpenAI request checks and response shapes
    server.py          the FastAPI app; launch.py starts it (`memtune serve`)
"""

from .adapters import AdapterError
from .engine import Engine, EngineConfig, StepEvent
from .sampling import SamplingParams
from .scheduler import Request

__all__ = ["AdapterError", "Engine", "EngineConfig", "Request", "SamplingParams", "StepEvent"]
