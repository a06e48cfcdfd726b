import json

import pytest

from memtune.demo import format_table, run_demo


@pytest.mark.slow
def test_demo_compares_full_and_lora(tmp_path):
    rows = run_demo(out_dir=str(tmp_path), epochs=1.0, quiet=True)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "lora", "full+tokentune", "qlora", "qa-lora", "qst", "mezo"}
    assert by["lora"]["params_trainable"] < 0.02 * by["full"]["params_trainable"]
    assert by["lora"]["memory_bytes"]["optimizer"] < 0.05 * by["full"]["memory_bytes"]["optimizer"]
    assert by["lora"]["memory_bytes"]["peak"] < by["full"]["memory_bytes"]["peak"]
    for r in rows:  # every row learns (MeZO from its centroid start)
        assert r["accuracy_after"] > r["accuracy_before"], r["method"]
    for quantized in ("qlora", "qa-lora", "qst"):  # 4-bit base: fewer frozen-weight bytes than LoRA's fp32 base
        assert by[quantized]["memory_bytes"]["parameters"] < by["lora"]["memory_bytes"]["parameters"]
    qst, qlora = by["qst"]["memory_bytes"], by["qlora"]["memory_bytes"]  # no backbone activations kept
    assert qst["activations"] < 0.5 * qlora["activations"] and qst["peak"] < qlora["peak"]
    mezo = by["mezo"]["memory_bytes"]
    assert mezo["gradients"] == mezo["optimizer"] == mezo["activations"] == 0
    assert mezo["peak"] < by["lora"]["memory_bytes"]["peak"]
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["full", "lora", "full+tokentune", "qlora", "qa-lora", "qst",
                                                    "mezo"]
    assert by["full+tokentune"]["memory_bytes"]["activations"] < by["full"]["memory_bytes"]["activations"]
    assert (tmp_path / "demo.png").stat().st_size > 5000
    assert "acc after" in format_table(rows)


@pytest.mark.slow
def test_demo_all_covers_every_adapter_method(tmp_path):
    from memtune.adapters import ADAPTERS
    from memtune.cli import build_parser
    from memtune.demo import METHODS, MORE_METHODS

    table = {**METHODS, **MORE_METHODS}
    kinds = {o.split("=", 1)[1] for rows in table.values() for o in rows if o.startswith("adapter.kind=")}
    # `memtune demo --all` has a row for every registered method that trains something
    assert kinds == set(ADAPTERS.names()) - {"none"}
    assert build_parser().parse_args(["demo", "--all"]).all
    # one step each (AdaLoRA's budget schedule needs more steps than that: tests/test_adalora.py runs it)
    names = [n for n in MORE_METHODS if n != "adalora"]
    rows = run_demo(out_dir=str(tmp_path), epochs=1.0, max_examples=16, methods=names, quiet=True)
    assert [r["method"] for r in rows] == names
    for r in rows:
        assert 0 < r["params_trainable"] < r["params_total"] and r["memory_bytes"]["peak"] > 0
