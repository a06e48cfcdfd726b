"""`memtune env`: versions, devices and capabilities for bug reports."""

import importlib.metadata
import json

import torch

from memtune.cli import main
from memtune.env import CPU_FLAGS, PACKAGES, collect


def test_env_prints_every_version_and_capability(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for p in PACKAGES:
        assert f"- {p} version: " in text
    assert f"- torch version: {torch.__version__}" in text
    assert "- CUDA available: " + ("yes" if torch.cuda.is_available() else "no") in text
    assert "- Python version: " in text and "- CPU: " in text and "- torch CPU capability: " in text


def test_env_json_is_the_same_report(capsys):
    assert main(["env", "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["transformers version"] == importlib.metadata.version("transformers")
    flags = fields["CPU flags memtune's paths depend on"]
    assert flags.startswith("unknown") or all(f"{f}=" in flags for f in CPU_FLAGS)
    assert fields["bitsandbytes AVX512-BF16 (packed NF4 CPU kernel)"] in ("yes", "no") or \
        fields["bitsandbytes AVX512-BF16 (packed NF4 CPU kernel)"].startswith(("n/a", "unknown"))


def test_a_missing_package_reads_not_installed(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert collect()["peft version"] == "not installed"
