"""The C++ segment kernel (`lora_kernel=native`): its build, its numbers against the Python loop in
every dtype and segment shape, its refusals, and the engine's fallback when it cannot be built."""

import shutil

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from memtune.errors import ConfigError
from memtune.serve import Engine, EngineConfig, SamplingParams, native_lora
from memtune.serve.lora_kernels import Factor, segment_lora

from test_serve_engine import engine, prompts  # noqa: F401  (fixtures base / adapter_dirs below)
from test_serve_engine import adapter_dirs, base  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def ext():
    mod = native_lora.load()
    if mod is None:
        if shutil.which("c++") and is_ninja_available():  # a compiler is here: not building is a bug
            pytest.fail(f"the native kernel did not build: {native_lora.build_error()}")
        pytest.skip(f"no C++ toolchain here: {native_lora.build_error()}")
    return mod


def packed(ranks, modules, d_in, d_out, dtype, seed=0):
    """A flat 'pool' holding every adapter's A (r, d_in) and B^T (r, d_out) per module, its tables,
    and the same factors as the Python loop's views. ranks[g][m] == 0: adapter g skips module m."""
    g = torch.Generator().manual_seed(seed)
    total = sum(r * (d_in + d_out) for row in ranks for r in row) + 7
    pool = (torch.randn(total, generator=g) * 0.1).to(dtype)
    meta = torch.zeros(len(ranks), modules, 3, dtype=torch.long)
    scale = torch.rand(len(ranks), modules, generator=g) + 0.5
    factors, off = [], 7  # start past 0: offsets are real
    for i, row in enumerate(ranks):
        per = {}
        for m, r in enumerate(row):
            if r == 0:
                continue
            a = pool[off:off + r * d_in].view(r, d_in)
            bt = pool[off + r * d_in:off + r * (d_in + d_out)].view(r, d_out)
            meta[i, m] = torch.tensor([off, off + r * d_in, r])
            off += r * (d_in + d_out)
            per[m] = Factor(a, bt.t(), float(scale[i, m]), a.t(), bt)
        factors.append(per)
    return pool, meta, scale, factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_equals_python_segment_loop(dtype):
    """Decode-length segments (GEMV path) and prefill-length ones (GEMM path), base-only gaps,
    adapters that skip a module, ranks 1..64, d_in != d_out."""
    mod = ext()
    d_in, d_out, modules = 48, 80, 3
    ranks = [[1, 8, 0], [64, 0, 16], [4, 4, 4], [0, 32, 2], [16, 16, 16]]
    lengths = [1, 9, 2, 5, 3]  # 9 and 5 tokens: above the GEMV limit
    pool, meta, scale, factors = packed(ranks, modules, d_in, d_out, dtype)
    segs, at = [], 2  # tokens 0, 1: base only; one gap between segments 2 and 3
    for i, n in enumerate(lengths):
        segs.append((at, at + n))
        at += n + (i == 2)
    T = at + 1
    x = torch.randn(T, d_in).to(dtype)
    for m in range(modules):
        y0 = torch.randn(T, d_out).to(dtype)
        ours = mod.sgmv_(y0.clone(), x, pool, torch.tensor(segs), meta, scale, m)
        # the reference in float32 from the same (rounded) factors
        cuts, pieces, prev = [], [], 0
        for i, (s, e) in enumerate(segs):
            if s > prev:
                cuts.append(s - prev)
            if m in factors[i]:
                f = factors[i][m]
                pieces.append((len(cuts), Factor(*(t.float() if torch.is_tensor(t) else t for t in f))))
            cuts.append(e - s)
            prev = e
        cuts.append(T - prev)
        ref = segment_lora(y0.float(), x.float(), cuts, pieces)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(ours.float(), ref, rtol=tol, atol=tol)
        untouched = [t for t in range(T) if not any(s <= t < e for s, e in segs)]
        assert torch.equal(ours[untouched], y0[untouched])


def test_native_refuses_bad_tables():
    mod = ext()
    pool, meta, scale, _ = packed([[4]], 1, 8, 8, torch.float32)
    x, y = torch.randn(3, 8), torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="segment 0 .* outside 3 rows"):
        mod.sgmv_(y, x, pool, torch.tensor([[1, 5]]), meta, scale, 0)
    far = meta.clone()
    far[0, 0, 1] = pool.numel()
    with pytest.raises(RuntimeError, match="factors outside the pool"):
        mod.sgmv_(y, x, pool, torch.tensor([[0, 1]]), far, scale, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        mod.sgmv_(y.double(), x.double(), pool, torch.tensor([[0, 1]]), meta, scale, 0)
    with pytest.raises(RuntimeError, match="module index 1"):
        mod.sgmv_(y, x, pool, torch.tensor([[0, 1]]), meta, scale, 1)


def test_build_is_named_after_the_cpu(monkeypatch):
    """A build tuned with -march=native is never loaded on a CPU with other flags."""
    from memtune import env

    monkeypatch.setattr(env, "_cpu", lambda: ("cpu-a", {"avx2"}))
    a = native_lora._build_name()
    monkeypatch.setattr(env, "_cpu", lambda: ("cpu-a", {"avx2", "avx512f"}))
    assert native_lora._build_name() != a


def test_engine_falls_back_without_the_build(base, adapter_dirs, monkeypatch):  # noqa: F811
    """auto: the Python segment loop, same tokens; native: a clear refusal."""
    ps, names = prompts(4, seed=9), list(adapter_dirs)[:4]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with_native = engine(base, adapter_dirs)  # auto on CPU
    assert with_native.native == (native_lora.load() is not None)
    want = [r.output_ids for r in with_native.generate(ps, names, params)]
    monkeypatch.setattr(native_lora, "load", lambda: None)
    monkeypatch.setattr(native_lora, "build_error", lambda: "RuntimeError: no compiler")
    fallback = engine(base, adapter_dirs)
    assert not fallback.native
    assert [r.output_ids for r in fallback.generate(ps, names, params)] == want
    with pytest.raises(ConfigError, match="native: the C\\+\\+ kernel did not build .*no compiler.*use segment"):
        Engine(base, with_native.tokenizer, EngineConfig(lora_kernel="native"))


def test_status_reports_the_build_without_building(monkeypatch, tmp_path):
    ext()  # built (or skipped where no toolchain is)
    assert native_lora.status().startswith("native (")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing built there
    monkeypatch.setattr(native_lora, "_module", None)
    monkeypatch.setattr(native_lora, "_tried", False)
    assert native_lora.status() == "native (built on first use, about 30 s)"
    monkeypatch.setattr(native_lora, "_tried", True)
    monkeypatch.setattr(native_lora, "_error", "RuntimeError: no headers")
    assert native_lora.status() == "Python loop (the C++ kernel did not build: RuntimeError: no headers)"
