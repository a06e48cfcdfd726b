"""`memtune generate` / `memtune chat` from trained runs: the engine where it can, the plain path otherwise."""

import json

import pytest

from conftest import ROOT, base_overrides
from memtune.cli import main
from memtune.serve import SamplingParams
from memtune.serve.run_model import TextGenerator, chat_loop

pytestmark = pytest.mark.usefixtures("one_thread")

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
RUNS = {  # name -> (overrides, the path generate takes)
    "full": (["adapter.kind=full", "optimizer.lr=1e-3"], "engine"),
    "lora": (["adapter.kind=lora", "adapter.r=4", "optimizer.lr=1e-2"], "engine"),
    "qlora": (["adapter.kind=lora", "adapter.r=4", "optimizer.lr=1e-2", "quantize.kind=nf4"], "engine"),
    "dylora": (["adapter.kind=dylora", "adapter.r=8", "adapter.rank=4", "optimizer.lr=1e-2"], "engine"),
    "adalora": (["adapter.kind=adalora", "adapter.init_r=6", "adapter.target_r=4", "optimizer.lr=1e-2"], "engine"),
    "qa-lora": (["adapter.kind=qalora", "adapter.r=4", "optimizer.lr=1e-2", "quantize.kind=int4",
                 "quantize.group_size=32"], "plain"),
    "qst": (["adapter.kind=qst", "adapter.r=4", "optimizer.lr=1e-2"], "plain"),
    "prefix": (["adapter.kind=prefix", "adapter.num_virtual_tokens=4", "optimizer.lr=1e-2"], "plain"),
    "prompt": (["adapter.kind=prompt", "adapter.num_virtual_tokens=4", "optimizer.lr=1e-2"], "plain"),
    "gpt2-lora": (["model=tiny-gpt2", "adapter.kind=lora", "adapter.r=4", "optimizer.lr=1e-2"], "plain"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (overrides, _) in RUNS.items():
        run = root / name
        model = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny-llama"]
        code = main(["train", *model, f"data.train={ALPACA}", "train.max_steps=3", "train.batch_size=4", *overrides,
                     *base_overrides(run)])
        assert code == 0, name
        out[name] = str(run)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_generate_from_every_kind_of_run(runs, name):
    gen = TextGenerator(runs[name])
    assert gen.path == RUNS[name][1], gen.why
    params = SamplingParams(max_tokens=12)
    text = gen.generate("Repeat the word apple.", params)
    assert isinstance(text, str)
    if gen.path == "engine":  # the engine's greedy text equals transformers' generate on memtune's model
        plain = TextGenerator(runs[name], prefer="plain")
        assert plain.generate("Repeat the word apple.", params) == text
        assert gen.engine.adapters.loads == (0 if name == "full" else 1)


def test_merged_and_quantized_folders_generate_through_the_engine(runs, tmp_path):
    """A merged QA-LoRA run is an INT4 folder: the engine serves it as a base, equal to the plain path."""
    assert main(["merge", runs["qa-lora"], "--to", str(tmp_path / "merged")]) == 0
    gen = TextGenerator(str(tmp_path / "merged"))
    assert gen.path == "engine", gen.why
    params = SamplingParams(max_tokens=10)
    assert gen.generate("Repeat", params) == TextGenerator(str(tmp_path / "merged"), prefer="plain").generate(
        "Repeat", params)
    assert TextGenerator("tiny-llama").path == "engine"


def test_generate_cli_streams_and_reports_the_path(runs, capsys):
    assert main(["generate", runs["lora"], "Repeat the word river.", "--max-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "engine"
    assert main(["generate", runs["qst"], "Repeat the word river.", "--max-tokens", "8", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["path"] == "plain" and "qst" in plain["why"]
    assert main(["generate", runs["lora"], "Repeat the word river.", "--max-tokens", "8",
                 "--temperature", "0.8", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", runs["lora"], "Repeat the word river.", "--max-tokens", "8",
                 "--temperature", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # a seed gives the same sample


def test_chat_uses_the_chat_template_and_keeps_history(runs):
    gen = TextGenerator(runs["lora"])
    lines = iter(["hello", "/reset", "again", "/exit"])
    written = []
    prompts = []
    stream = gen.stream
    gen.stream = lambda prompt, p: (prompts.append(prompt), stream(prompt, p))[1]
    assert chat_loop(gen, SamplingParams(max_tokens=6), read=lambda _: next(lines),
                     write=lambda *a, **k: written.append(a[0] if a else "")) == 0
    assert len(prompts) == 2 and all(p.startswith("<|im_start|>user\n") for p in prompts)
    assert "hello" not in prompts[1]  # /reset cleared the history
    assert prompts[0].endswith("<|im_start|>assistant\n")


def test_generate_refuses_runs_that_make_no_text(tmp_path, capsys):
    run = tmp_path / "cls"
    train = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv")
    assert main(["train", "model=tiny-bert", "task=classification", f"data.train={train}", "adapter.kind=lora",
                 "train.max_steps=1", *base_overrides(run)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "hi"]) != 0
    assert "does not generate text" in capsys.readouterr().err
