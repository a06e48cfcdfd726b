"""`memtune env`: what a bug report needs to carry, in the style of `transformers env` / `accelerate env`.

Versions of memtune and the libraries its paths go through, the devices, and the capabilities that
switch those paths: CUDA and bf16 on the GPU; on the CPU the instruction sets torch and bitsandbytes
dispatch on (AVX512-BF16 decides whether bitsandbytes may repack NF4 layers for its inference kernel,
see memtune.storage.bnb_layout; AMX speeds up bf16 matmuls). Nothing here imports a library that is
not installed: a missing one reads "not installed".
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

# kernels: bitsandbytes fetches its AVX512-BF16 CPU GEMM through it when installed
PACKAGES = ("memtune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers",
            "datasets", "kernels", "ninja")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> tuple[str, set[str]]:
    """CPU model name and flags (Linux /proc/cpuinfo; elsewhere the platform's processor string)."""
    info = Path("/proc/cpuinfo")
    name, flags = platform.processor() or platform.machine(), set()
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return name, flags


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def collect() -> dict[str, str]:
    """Field -> value, in the order they are printed."""
    import torch

    out = {f"{p} version": _version(p) for p in PACKAGES}
    out["Python version"] = sys.version.split()[0]
    out["Platform"] = platform.platform()
    out["torch CUDA build"] = str(torch.version.cuda or "none (CPU build)")
    name, flags = _cpu()
    out["CPU"] = f"{name} ({os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads)"
    try:
        import psutil

        out["RAM"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    out["torch CPU capability"] = cap() if cap else "unknown"
    out["CPU flags memtune's paths depend on"] = ", ".join(f"{f}={_yes(f in flags)}" for f in CPU_FLAGS) \
        if flags else "unknown (no /proc/cpuinfo)"
    out["bitsandbytes AVX512-BF16 (packed NF4 CPU kernel)"] = _bnb_avx512bf16()
    from .serve import native_lora

    out["serve LoRA kernel on the CPU"] = native_lora.status()
    out["CUDA available"] = _yes(torch.cuda.is_available())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out[f"GPU {i}"] = (f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability "
                               f"{p.major}.{p.minor}")
        out["GPU bf16"] = _yes(torch.cuda.is_bf16_supported())
        out["cuDNN version"] = str(torch.backends.cudnn.version())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out["MPS available"] = "yes"
    launcher = {k: os.environ[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    if launcher:
        out["Launcher environment"] = ", ".join(f"{k}={v}" for k, v in launcher.items())
    return out


def _bnb_avx512bf16() -> str:
    if _version("bitsandbytes") == "not installed":
        return "n/a (bitsandbytes not installed)"
    try:
        from .storage.bnb_layout import cpu_supports_packed

        return _yes(cpu_supports_packed())
    except Exception as e:  # a broken native library must not stop the report that describes it
        return f"unknown ({type(e).__name__}: {e})"


def format_report(fields: dict[str, str]) -> str:
    lines = ["Copy-and-paste the text below in your bug report.", ""]
    lines += [f"- {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines)
