"""The segment LoRA loop in C++ (`csrc/sgmv_cpu.cpp`): one call per adapted layer per step, on the CPU.

Why our own: on a CPU the Python segment loop's cost is dispatch, not FLOPs. A decode step over 32
distinct adapters runs two small GEMMs per adapter per adapted layer (2,048 ops for 32 layers),
and that overhead grows with the number of adapters in the batch, which is what kept throughput at
1000 adapters below that at 10. S-LoRA closes the same gap on a GPU with one fused launch per layer
(MBGMV); this is that shape for the CPU: the loop over segments runs in C++, decode segments as two
GEMVs per token reading the factors in place from the page pool, prefill segments as ATen GEMMs.

It is built on first use with torch's own extension builder (`torch.utils.cpp_extension.load`,
the system C++ compiler and ninja), tuned to this CPU (`-march=native`, and the build is named
after the CPU's flags so another CPU never loads it), and cached under torch's extensions folder.
When it cannot be built, `load()` returns None with the reason in `build_error()`, and the engine
stays on the Python segment loop (`lora_kernel=auto`) or refuses (`lora_kernel=native`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "sgmv_cpu.cpp"

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _build_name() -> str:
    from ..env import _cpu

    name, flags = _cpu()
    digest = hashlib.sha1((name + " ".join(sorted(flags))).encode()).hexdigest()[:10]
    return f"memtune_sgmv_cpu_{digest}"


def load():
    """The compiled module (with `sgmv_`), or None when it cannot be built here."""
    global _module, _error, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            from torch.utils import cpp_extension

            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja is not installed (pip install ninja)")
            flags = ["-O3", "-march=native", "-fopenmp-simd"]
            name = _build_name()
            where = Path(cpp_extension._get_build_directory(name, False))  # torch's own cache folder for it
            if not (where / f"{name}.so").is_file():
                print(f"memtune: building the C++ LoRA kernel for this CPU (once; cached in {where})",
                      file=sys.stderr, flush=True)
            _module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                         verbose=bool(os.environ.get("MEMTUNE_VERBOSE_BUILD")))
        except Exception as e:  # a missing compiler, headers or ninja: the Python loop still serves
            _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            _module = None
        return _module


def status() -> str:
    """What `memtune env` reports, without building: built (cached), buildable on first use, or why not."""
    import shutil

    from torch.utils import cpp_extension

    if _module is not None:
        return f"native (loaded: {_module.__file__})"
    if _tried:
        return f"Python loop (the C++ kernel did not build: {_error})"
    if not cpp_extension.is_ninja_available() or shutil.which(os.environ.get("CXX", "c++")) is None:
        return "Python loop (no C++ compiler or ninja here)"
    name = _build_name()
    so = Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
    return f"native (built: {so})" if so.is_file() else "native (built on first use, about 30 s)"


def build_error() -> str | None:
    """Why `load()` returned None (after it was called), else None."""
    return _error
