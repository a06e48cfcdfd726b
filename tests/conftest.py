import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEMO_DATA = ROOT / "src" / "memtune" / "demo_data"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pytest_sessionstart(session):
    """Build the serving engine's C++ kernel (native_lora) once up front, so no test that times a server's
    start pays for the first build (about 30 s on 2 cores; cached under torch's extensions folder after)."""
    from memtune.serve import native_lora

    native_lora.load()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster when the cores are shared (OpenMP
    workers spin-waiting for a busy core). Modules opt in: pytestmark = usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def alpaca_file(tmp_path):
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
            for w in ["apple", "river", "stone", "cloud", "ember", "flute", "grape", "harp"]]
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


@pytest.fixture
def cls_file(tmp_path):
    lines = ["text\tlabel"] + [f"good movie number {i}\tpositive" if i % 2 else f"bad film {i}\tnegative"
                               for i in range(16)]
    p = tmp_path / "cls.tsv"
    p.write_text("\n".join(lines) + "\n")
    return p


def base_overrides(out: Path, **extra) -> list[str]:
    o = {"train.progress": "false", "output_dir": str(out), "train.measure_memory_steps": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def randomize(model, seed=0, scale=0.1, add=False):
    """Every trainable tensor set to (or, with `add`, shifted by) seeded N(0, scale^2) draws, so
    adapters that start as the identity (B = 0, Λ = 0, b = 0) change the outputs in tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                draw = torch.randn(p.shape, generator=g) * scale
                p.add_(draw) if add else p.copy_(draw)


def inputs(seed=1):
    """A seeded batch of token ids (2, 11) inside every preset's vocabulary."""
    return {"input_ids": torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(seed))}


def logits(model, seed=1):
    """The model's logits on `inputs(seed)`, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return model(**inputs(seed)).logits
