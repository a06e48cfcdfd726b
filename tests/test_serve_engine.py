"""The serving engine against PEFT + HF generate (the oracle), and its pool, cache and scheduler."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from memtune.models import byte_tokenizer
from memtune.serve import AdapterError, Engine, EngineConfig, SamplingParams
from memtune.serve.batched_lora import LoraContext, wrap_linears
from memtune.serve.lora_kernels import Segment
from memtune.serve.pool import PagePool, PoolFull, PoolShape

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, targets, extra LoraConfig fields): mixed ranks, module subsets, rsLoRA, rank / alpha patterns
ADAPTERS = {
    "r2-qv": (2, ["q_proj", "v_proj"], {}),
    "r4-all": (4, ALL, {}),
    "r8-rs": (8, ["q_proj", "k_proj", "o_proj", "down_proj"], {"use_rslora": True}),
    "r16-mlp": (16, ["gate_proj", "up_proj", "down_proj"], {}),
    "r4-pattern": (4, ALL, {"rank_pattern": {"v_proj": 2, "down_proj": 8}, "alpha_pattern": {"o_proj": 3.0}}),
    "r1-k": (1, ["k_proj"], {}),
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=257, eos_token_id=258, pad_token_id=256, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def write_peft_adapter(base, path, r, targets, extra, seed):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # larger B so adapters change greedy tokens
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_peft_adapter(base, root / name, r, t, extra, i))
            for i, (name, (r, t, extra)) in enumerate(ADAPTERS.items())}


def engine(base, dirs=None, **cfg) -> Engine:
    eng = Engine(copy.deepcopy(base), byte_tokenizer(), EngineConfig(**{"pool_mib": 2, "page_tokens": 4, **cfg}))
    for name, path in (dirs or {}).items():
        eng.add_adapter(name, path)
    return eng


def peft_greedy(base, path, prompt, new):
    model = PeftModel.from_pretrained(copy.deepcopy(base), path) if path else copy.deepcopy(base)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=256)
    return out[0, len(prompt):].tolist()


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_mixed_batch_equals_peft_per_adapter(base, adapter_dirs):
    """Many adapters, mixed ranks and targets, different lengths, requests joining mid-flight:
    each request's greedy tokens equal HF generate with PEFT for its adapter alone."""
    names = list(adapter_dirs) + [None]
    eng = engine(base, adapter_dirs)
    ps = prompts(14)
    news = [3 + (i * 5) % 11 for i in range(len(ps))]
    reqs = []
    for i, (p, new) in enumerate(zip(ps, news)):
        reqs.append(eng.add_request(p, names[i % len(names)], SamplingParams(max_tokens=new, ignore_eos=True)))
        if i % 3 == 2:  # the rest join while earlier ones decode
            eng.step()
    eng.run()
    assert eng.steps > max(news)  # it really interleaved
    for r, p, new in zip(reqs, ps, news):
        ref = peft_greedy(base, adapter_dirs.get(r.adapter), p, new)
        assert r.output_ids == ref, r.adapter
        assert r.finish_reason == "length"


@pytest.mark.parametrize("kernel", ["segment", "gather", "native"])
def test_kernels_equal_peft_mixed_batch(base, adapter_dirs, kernel):
    """Every adapted layer: our packed rows with each kernel equal PEFT's mixed-batch layer forward
    (`adapter_names`, one adapter per row) on the same input."""
    names = ["r2-qv", "r4-all", "r8-rs", "r4-pattern", "r16-mlp"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(adapter_dirs[n], adapter_name=n)
    eng = engine(base, {n: adapter_dirs[n] for n in names})
    factors = [eng.adapters.acquire(n) for n in names]
    segs = [Segment(7 * i, 7 * i + 7, i) for i in range(len(names))]
    checked = 0
    for name, layer in [(n, m) for n, m in eng.model.named_modules() if type(m).__name__ == "BatchedLoraLinear"]:
        h = torch.randn(len(names), 7, layer.in_features)
        eng.lora.step = eng.step_lora(segs, factors, kernel)
        with torch.no_grad():
            ours = layer(h.reshape(1, -1, layer.in_features)).reshape(len(names), 7, -1)
            expect = peft_model.base_model.model.get_submodule(name)(h, adapter_names=names)
        eng.lora.step = None
        torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-5)  # gather sums in another order
        checked += 1
    assert checked == 14


def test_segment_gather_and_native_kernels_agree(base, adapter_dirs):
    """The three kernels over every module of every adapter, with base-only tokens between segments
    (segments of 1-3 tokens: the native kernel's GEMV path; the PEFT test above covers its GEMM path)."""
    names = list(adapter_dirs)
    eng = engine(base, adapter_dirs)
    factors = [eng.adapters.acquire(n) for n in names]
    segs, start = [], 3  # tokens 0..2: no adapter
    for i in range(len(names)):
        segs.append(Segment(start, start + 1 + i % 3, i))
        start += 1 + i % 3
    for layer in [m for m in eng.model.modules() if type(m).__name__ == "BatchedLoraLinear"]:
        x = torch.randn(start, layer.in_features)
        outs = {}
        for kernel in ("segment", "gather", "native"):
            eng.lora.step = eng.step_lora(segs, factors, kernel)
            with torch.no_grad():
                outs[kernel] = layer(x[None])[0]
        eng.lora.step = None
        torch.testing.assert_close(outs["segment"], outs["gather"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs["segment"], outs["native"], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(outs["segment"][:3], layer.base_layer(x[:3]))


def test_engine_kernels_give_same_tokens(base, adapter_dirs):
    ps, names = prompts(6, seed=3), list(adapter_dirs)
    outs = []
    for kernel in ("segment", "gather", "native"):
        eng = engine(base, adapter_dirs, lora_kernel=kernel)
        outs.append([r.output_ids for r in eng.generate(ps, names, SamplingParams(max_tokens=8, ignore_eos=True))])
    assert outs[0] == outs[1] == outs[2]


def test_paged_attention_equals_dense_cache(base):
    """Logits of every step equal HF's forward with its DynamicCache, prefill and decode, GQA model."""
    eng = engine(base, page_tokens=3)
    ps = prompts(3, seed=5)
    reqs = [eng.add_request(p, None, SamplingParams(max_tokens=6, ignore_eos=True)) for p in ps]
    seen = {r.id: [] for r in reqs}
    while eng.has_work():
        eng.step()
        for rid, lg in eng.last_logits.items():
            seen[rid].append(lg.clone())
    for r, p in zip(reqs, ps):
        ids = torch.tensor([p + r.output_ids])
        with torch.no_grad():
            full = base(input_ids=ids).logits[0]  # (L, V), dense causal attention over the whole sequence
        steps = torch.stack(seen[r.id])
        torch.testing.assert_close(steps, full[len(p) - 1:len(p) - 1 + len(r.output_ids)], rtol=1e-4, atol=1e-5)


def test_nf4_base_equals_peft_over_the_same_bitsandbytes_base(base, adapter_dirs):
    """QLoRA serving: the engine over an NF4 base vs PEFT over the identical bitsandbytes layers."""
    from memtune.storage import STORAGE
    from memtune.storage.nf4 import NF4Config

    storage = STORAGE.get("nf4")(NF4Config(kind="nf4"))
    q = copy.deepcopy(base)
    storage.apply(q)
    storage.prepare(q, for_training=False)
    names = ["r4-all", "r8-rs", "r16-mlp"]
    eng = Engine(copy.deepcopy(q), byte_tokenizer(), EngineConfig(pool_mib=2, page_tokens=4))
    for n in names:
        eng.add_adapter(n, adapter_dirs[n])
    ps = prompts(3, seed=7)
    reqs = eng.generate(ps, names, SamplingParams(max_tokens=8, ignore_eos=True))
    assert eng.memory()["weights"] < 0.6 * sum(p.numel() * 4 for p in base.parameters())
    for r, p in zip(reqs, ps):
        assert r.output_ids == peft_greedy(q, adapter_dirs[r.adapter], p, 8)


def test_evict_and_reload_gives_identical_outputs(base, adapter_dirs):
    """A pool with room for about one adapter: alternating adapters evicts and reloads them."""
    names = ["r16-mlp", "r4-all", "r16-mlp", "r4-all"]
    ref = engine(base, adapter_dirs)
    p = prompts(1, seed=11)[0]
    expect = {n: ref.generate([p], [n], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_ids for n in names}
    big = max(ref.adapters.host[n].numel for n in names)
    pages = ref.pool.adapter_pages_for(big) + ref.pool.kv_pages_for(len(p) + 6) + 2
    eng = engine(base, adapter_dirs, pool_mib=pages * ref.pool.page_bytes / 2**20)
    for n in names:  # one at a time: each request needs the other adapter's pages
        assert eng.generate([p], [n], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_ids == expect[n]
    assert eng.adapters.evictions >= 3 and eng.adapters.loads >= 4


def test_a_registered_adapter_does_not_follow_its_file(base, adapter_dirs, tmp_path):
    """Host adapters are copies: rewriting the file in place after registration (same size, other
    values; safetensors maps files lazily) changes nothing the engine serves."""
    import shutil

    src = tmp_path / "ad"
    shutil.copytree(adapter_dirs["r4-all"], src)
    p = prompts(1, seed=13)[0]
    want = engine(base, {"x": src}).generate([p], ["x"], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_ids
    eng = engine(base, {"x": src})  # registered, not yet loaded into the pool
    weights = src / "adapter_model.safetensors"
    tensors = load_file(weights)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # in place: the same inode, the same length
        f.write(b"\0" * 8 + bytes(size - 8))
    got = eng.generate([p], ["x"], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_ids
    save_file(tensors, weights)
    assert got == want


def test_every_page_is_free_after_a_run(base, adapter_dirs):
    eng = engine(base, adapter_dirs, max_running=4)
    names = list(adapter_dirs)
    eng.generate(prompts(12, seed=2), [names[i % len(names)] for i in range(12)],
                 SamplingParams(max_tokens=5, ignore_eos=True))
    mem = eng.memory()
    assert mem["kv_pages"] == 0 and not eng.pool.tables and not eng.adapters.pins
    assert mem["kv_pages"] + mem["adapter_pages"] + mem["free"] == mem["pool"]
    while eng.adapters.evict_one():
        pass
    assert eng.pool.num_free() == eng.pool.num_pages


def test_preemption_recomputes_and_gives_the_same_tokens(base, adapter_dirs):
    """A pool too small for every sequence at full length: the latest request is preempted, then
    re-admitted with its tokens so far, and greedy output is unchanged."""
    ps = [prompts(1, seed=20 + i)[0][:6] + [1] * 6 for i in range(4)]
    names = ["r4-all", None, "r2-qv", None]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = [r.output_ids for r in engine(base, adapter_dirs).generate(ps, names, params)]
    used = {n: adapter_dirs[n] for n in ("r4-all", "r2-qv")}
    eng = engine(base, used)
    need = eng.pool.kv_pages_for(32) * 2 + sum(eng.pool.adapter_pages_for(eng.adapters.host[n].numel)
                                               for n in ("r4-all", "r2-qv")) + 2
    small = engine(base, used, pool_mib=need * eng.pool.page_bytes / 2**20)
    out = small.generate(ps, names, params)
    assert small.scheduler.preemptions > 0
    assert [r.output_ids for r in out] == ref
    assert small.pool.num_free() + sum(n for _, n in small.pool.runs.values()) == small.pool.num_pages


def test_adapter_cap_per_batch(base, adapter_dirs):
    """At most max_adapters distinct adapters run together; the others wait their turn and finish."""
    names = list(adapter_dirs)
    eng = engine(base, adapter_dirs, max_adapters=2)
    reqs = [eng.add_request(p, n, SamplingParams(max_tokens=4, ignore_eos=True)) for p, n in zip(prompts(6), names)]
    most = 0
    while eng.has_work():
        eng.step()
        most = max(most, len({r.adapter for r in eng.scheduler.running}))
    assert most == 2 and all(r.finish_reason == "length" for r in reqs)


def test_pool_moves_kv_pages_to_make_an_adapter_run():
    pool = PagePool(PoolShape(1, 1, 2, 2), 10, torch.float32, torch.device("cpu"))
    for seq in range(10):  # one KV page each, from the top: seq 0 -> page 9, ..., seq 9 -> page 0
        pool.grow(seq, 2)
    for seq in range(0, 10, 2):
        pool.release(seq)  # free pages 9, 7, 5, 3, 1: five free, no two adjacent
    for seq, table in pool.tables.items():
        pool.storage[table] = float(seq)
    flat = pool.place_adapter("big", 3 * pool.page_elems)  # 3 contiguous pages: a KV page must move
    assert pool.moves == 1 and flat.numel() == 3 * pool.page_elems
    for seq, table in pool.tables.items():  # every sequence's data followed its pages
        assert torch.equal(pool.storage[table], torch.full((1, pool.page_elems), float(seq)))
    start, n = pool.runs["big"]
    assert not set(range(start, start + n)) & {p for t in pool.tables.values() for p in t}
    with pytest.raises(PoolFull):  # two pages left
        pool.place_adapter("more", 3 * pool.page_elems)
    pool.remove_adapter("big")
    for seq in list(pool.tables):
        pool.release(seq)
    assert pool.num_free() == 10


def test_sampling_seeded_and_independent_of_the_batch(base, adapter_dirs):
    p = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    alone = engine(base, adapter_dirs).generate([p], ["r4-all"], params)[0].output_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)]
    mixed = engine(base, adapter_dirs).generate([p] + prompts(3), ["r4-all", None, "r2-qv", "r4-all"],
                                                [params] + others)
    assert mixed[0].output_ids == alone
    greedy = engine(base, adapter_dirs).generate([p], ["r4-all"], SamplingParams(max_tokens=10, ignore_eos=True))
    top1 = engine(base, adapter_dirs).generate([p], ["r4-all"], SamplingParams(max_tokens=10, temperature=0.7,
                                                                               top_k=1, ignore_eos=True))
    assert greedy[0].output_ids == top1[0].output_ids


def test_stop_strings_eos_and_streamed_text(base):
    eng = engine(base)
    tok = byte_tokenizer()
    p = prompts(1, seed=9)[0]
    free = eng.generate([p], None, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    text = tok.decode(free.output_ids, skip_special_tokens=True)
    at = next(i for i in range(2, len(text) - 2) if text.find(text[i:i + 2]) == i)  # a first occurrence
    stop = text[at:at + 2]
    req = eng.add_request(p, None, SamplingParams(max_tokens=24, stop=[stop], ignore_eos=True))
    streamed = ""
    while eng.has_work():
        for ev in eng.step():
            streamed += ev.text
    assert req.finish_reason == "stop" and req.text == text[:at] == streamed
    # EOS: make the EOS token the first greedy token of a fresh engine's model
    eos_first = engine(base)
    eos_first.eos = {free.output_ids[0]}
    r = eos_first.generate([p], None, SamplingParams(max_tokens=24))[0]
    assert r.finish_reason == "stop" and r.output_ids == free.output_ids[:1] and r.text == ""


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(base, adapter_dirs, tmp_path):
    eng = engine(base, {"good": adapter_dirs["r4-all"]})
    src = adapter_dirs["r2-qv"]
    cfg = json.loads(open(f"{src}/adapter_config.json").read())
    tensors = load_file(f"{src}/adapter_model.safetensors")

    def make(name, config=cfg, weights=tensors, pickle=False):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config))
        if pickle:
            torch.save(weights, d / "adapter_model.bin")
        elif weights is not None:
            save_file(weights, str(d / "adapter_model.safetensors"))
        return d

    k0 = next(k for k in tensors if "lora_A" in k)
    cases = {
        "missing": (tmp_path / "nope", "no such directory"),
        "pickle": (make("pickle", pickle=True), "pickle"),
        "rank": (make("rank", {**cfg, "r": 3}), "rank 2 in the file, 3 in adapter_config.json"),
        "shape": (make("shape", weights={**tensors, k0: torch.zeros(2, 32)}), "do not fit a linear layer"),
        "target": (make("target", weights={**tensors, k0.replace("q_proj", "qq_proj"): tensors[k0].clone(),
                                           k0.replace("q_proj", "qq_proj").replace("lora_A", "lora_B"):
                                           torch.zeros(64, 2)}), "'model.layers.0.self_attn.qq_proj' is not a linear"),
        "saved": (make("saved", {**cfg, "modules_to_save": ["lm_head"]}), "modules_to_save"),
        "dora": (make("dora", {**cfg, "use_dora": True}), "use_dora"),
    }
    for name, (path, why) in cases.items():
        with pytest.raises(AdapterError, match="adapter 'bad-" + name) as e:
            eng.add_adapter("bad-" + name, path)
        assert why in str(e.value), (name, str(e.value))
    with pytest.raises(AdapterError, match="expected 1-64"):
        eng.add_adapter("../etc", adapter_dirs["r2-qv"])
    out = eng.generate(prompts(2), ["good", None], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [r.output_ids for r in out] == [peft_greedy(base, adapter_dirs["r4-all"], prompts(2)[0], 4),
                                           peft_greedy(base, None, prompts(2)[1], 4)]
    assert sorted(eng.adapters.host) == ["good"]


def test_requests_that_cannot_fit_are_refused(base):
    from memtune.errors import ConfigError, ModelError

    eng = engine(base)
    with pytest.raises(ConfigError, match="over the model's context of 512"):
        eng.add_request([1] * 500, None, SamplingParams(max_tokens=20))
    with pytest.raises(ModelError, match="not registered"):
        eng.add_request([1], "nope")
    with pytest.raises(ConfigError, match="top_p"):
        eng.add_request([1], None, SamplingParams(top_p=0))
    small = engine(base, pool_mib=4 * eng.pool.page_bytes / 2**20)
    with pytest.raises(ConfigError, match="pool pages"):
        small.add_request([1] * 40, None, SamplingParams(max_tokens=10))


def test_wrapping_keeps_the_base_output_without_adapters(base):
    model = copy.deepcopy(base)
    ctx = LoraContext()
    wrap_linears(model, ["model.layers.0.mlp.up_proj"], ctx)
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)


def test_bf16_base_follows_the_dense_bf16_forward(base, adapter_dirs):
    """A bf16 base: pool and adapters in bf16; each step's logits stay close to HF's bf16 forward of
    the merged sequence (bf16 rounding differs between packed and dense order, so not bit-equal)."""
    bf = copy.deepcopy(base).to(torch.bfloat16)
    eng = Engine(copy.deepcopy(bf), byte_tokenizer(), EngineConfig(pool_mib=2, page_tokens=4))
    eng.add_adapter("r4-all", adapter_dirs["r4-all"])
    assert eng.pool.storage.dtype == torch.bfloat16
    p = prompts(1, seed=13)[0]
    req = eng.add_request(p, "r4-all", SamplingParams(max_tokens=6, ignore_eos=True))
    seen = []
    while eng.has_work():
        eng.step()
        seen.append(eng.last_logits[req.id].clone())
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bf), adapter_dirs["r4-all"]).to(torch.bfloat16)
    with torch.no_grad():
        full = peft_model(input_ids=torch.tensor([p + req.output_ids])).logits[0].float()
    ours = torch.stack(seen)
    ref = full[len(p) - 1:len(p) - 1 + len(req.output_ids)]
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


def test_incremental_detokenization_equals_the_full_decode(base):
    """Multi-byte characters split across byte tokens: the streamed text waits for the whole character."""
    from memtune.serve.scheduler import Request

    eng = engine(base)
    tok = byte_tokenizer()
    text = "héllo wörld, 日本 ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # some characters take several tokens
    r = Request(0, [1], None, SamplingParams(max_tokens=100), 0.0)
    seen = []
    for i in range(1, len(ids) + 1):
        r.output_ids = ids[:i]
        seen.append(eng._detokenize(r, i))
        assert "\ufffd" not in seen[-1] and text.startswith(seen[-1])
    assert seen[-1] == text


def test_an_adapter_in_use_cannot_be_removed(base, adapter_dirs):
    eng = engine(base, {"a": adapter_dirs["r2-qv"]}, max_running=1)
    eng.add_request([1, 2, 3], "a", SamplingParams(max_tokens=3))
    eng.add_request([1, 2, 3], "a", SamplingParams(max_tokens=3))
    with pytest.raises(AdapterError, match="2 waiting"):
        eng.remove_adapter("a")
    eng.step()  # one runs (pinned), one waits
    with pytest.raises(AdapterError, match="in use by"):
        eng.remove_adapter("a")
    eng.run()
    eng.remove_adapter("a")
    assert not eng.adapters.host and eng.pool.num_free() == eng.pool.num_pages
    with pytest.raises(AdapterError, match="not registered"):
        eng.remove_adapter("a")
