"""Helpers shared by the benchmark scripts: tables, JSON results, environment facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"commit": commit, "device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def table(head: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


LLAMA_SIZES = {  # random-init Llama shapes for benchmarks where per-op overheads must not dominate
    "llama-small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4),  # ~60M
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),  # ~1.1B (TinyLlama-1.1B's shape)
}


def llama_sized(name: str):
    """A seeded random-init LlamaForCausalLM of one of LLAMA_SIZES (vocab 32000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **LLAMA_SIZES[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def pick_device(spec: str) -> torch.device:
    return torch.device("cuda" if spec == "auto" and torch.cuda.is_available() else ("cpu" if spec == "auto" else spec))


def release(device: torch.device) -> None:
    """Return a measured model's memory to the device before the next measurement."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def measure_step(model, task, batch: dict, device, rounds: int = 3, lr: float = 1e-5) -> dict:
    """One AdamW step (backprop) at steady state under memtune's tracker: the step is run twice under
    the tracker (the second has gradients and optimizer state), then timed `rounds` more times.
    Returns the tracker's report plus `step_seconds` (median)."""
    import statistics
    import time

    from memtune.gradient.backprop import AdamWConfig, Backprop
    from memtune.memory.tracker import MemoryTracker
    from memtune.recipe import TrainConfig

    model.to(device).train()
    rule = Backprop(AdamWConfig(lr=lr), model, task, TrainConfig(schedule="constant"), 10, contextlib.nullcontext)
    tracker = MemoryTracker(model, rule.optimizer)
    for _ in range(2):
        with tracker.measure(*batch.values()):
            rule.step([dict(batch)])
            sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        rule.step([dict(batch)])
        sync(device)
        times.append(time.perf_counter() - t0)
    return {**tracker.report().to_dict(), "step_seconds": statistics.median(times) if times else None}
