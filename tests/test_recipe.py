import pytest

from conftest import EXAMPLES
from memtune.errors import ConfigError
from memtune.recipe import load_recipe, parse_override


def test_every_example_config_loads():
    configs = sorted(EXAMPLES.glob("*.yaml"))
    assert len(configs) >= 5
    for cfg in configs:
        r = load_recipe(cfg)
        assert r.model and r.output_dir


def test_overrides_parse_types_and_lists():
    r = load_recipe(None, ["adapter.kind=lora", "adapter.r=16", "adapter.targets=[q_proj,v_proj]",
                           "optimizer.lr=1e-4", "train.max_steps=50", "train.gradient_checkpointing=true"])
    assert r.adapter.r == 16 and r.adapter.targets == ["q_proj", "v_proj"]
    assert r.optimizer.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; the field coerces it
    assert r.train.max_steps == 50 and r.train.gradient_checkpointing is True


def test_override_beats_yaml(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("adapter: {kind: lora, r: 4}\ntrain: {batch_size: 2}\n")
    r = load_recipe(cfg, ["adapter.r=32"])
    assert r.adapter.r == 32 and r.train.batch_size == 2


def test_short_section_form():
    assert load_recipe(None, ["adapter=lora"]).adapter.kind == "lora"


@pytest.mark.parametrize("overrides, needle", [
    (["adapter.rr=3"], "adapter.rr: unknown key"),
    (["adapter.kind=lora", "adapter.r=abc"], "adapter.r: expected an integer, got 'abc'"),
    (["adapter.kind=nope"], "adapter.kind: unknown adapter kind 'nope'"),
    (["train.precision=fp8"], "train.precision: expected one of 'fp32', 'bf16'"),
    (["modle=tiny-llama"], "modle: unknown key"),
    (["train.batch_size=0"], "train.batch_size: expected a positive integer"),
    (["optimizer.lr=-1"], "optimizer.lr: expected a positive learning rate"),
    (["adapter.kind=lora", "adapter.r=0"], "adapter.r: expected a rank >= 1"),
    (["train.max_steps=1.5"], "train.max_steps: expected an integer"),
    (["data.labels=[a]"], "data.labels: expected at least 2"),
    (["adapter.r=4"], "for adapter.kind 'full'"),
])
def test_bad_config_names_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, overrides)
    assert needle in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny-llama\ntrain:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_recipe(cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_recipe(tmp_path / "missing.yaml")
    cfg.write_text("train:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.batch_size: expected an integer"):
        load_recipe(cfg)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("adapter.r")
