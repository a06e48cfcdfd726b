import json

import pytest
import torch

from conftest import DEMO_DATA, write_jsonl
from memtune.data import IGNORE, collate, epoch_order, infer_labels, load_data, read_records
from memtune.data.formats import alpaca_prompt
from memtune.errors import DataError
from memtune.models import byte_tokenizer, build_preset


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def decode_targets(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def test_text_format_trains_on_every_token(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    ex = load_data(str(f), task="causal-lm", fmt="auto", tokenizer=tok, max_length=64).examples[0]
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"], skip_special_tokens=True) == "hello world"


def test_alpaca_loss_only_on_response(alpaca_file, tok):
    data = load_data(str(alpaca_file), task="causal-lm", fmt="auto", tokenizer=tok, max_length=512)
    assert data.format == "alpaca"
    ex = data.examples[0]
    assert decode_targets(tok, ex) == "apple apple</s>"
    prompt_len = len(tok(alpaca_prompt("Repeat the word apple.", ""), add_special_tokens=False)["input_ids"]) + 1
    assert all(v == IGNORE for v in ex["labels"][:prompt_len])


def test_messages_loss_only_on_assistant_turns(tmp_path, tok):
    conv = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    f = write_jsonl(tmp_path / "c.jsonl", [conv])
    data = load_data(str(f), task="causal-lm", fmt="auto", tokenizer=tok, max_length=512)
    assert data.format == "messages"
    ex = data.examples[0]
    # targets are exactly the two assistant contents with their end-of-turn markers
    runs, cur = [], []
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)); cur = []
    if cur:
        runs.append(tok.decode(cur))
    assert runs == ["hello<|im_end|>\n", "4<|im_end|>\n"]


def test_classification_labels_and_pairs(tmp_path):
    tok = build_preset("tiny-bert", "classification", ["a", "b"]).tokenizer
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "a cat", "text_pair": "a dog", "label": "yes"},
                                           {"text": "a cat", "text_pair": "a car", "label": "no"}])
    labels = infer_labels(read_records(str(f)), str(f))
    assert labels == ["no", "yes"]
    data = load_data(str(f), task="classification", fmt="auto", tokenizer=tok, max_length=32, labels=labels)
    assert [e["label"] for e in data.examples] == [1, 0]
    assert 1 in data.examples[0]["token_type_ids"]  # the pair is encoded as segment B


def test_integer_labels_and_sst2_style_tsv(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text('sentence\tlabel\nit \'s a "great" film \t1\nawful \t0\n')
    recs = read_records(str(p))
    assert recs[0].fields["sentence"] == 'it \'s a "great" film '  # quotes are plain characters in TSV
    assert infer_labels(recs, str(p)) == ["0", "1"]


def test_bundled_demo_data_is_balanced():
    recs = read_records(str(DEMO_DATA / "sentiment_train.tsv"))
    labels = [r.fields["label"] for r in recs]
    assert len(recs) == 320 and labels.count("positive") == labels.count("negative")


@pytest.mark.parametrize("content, needle", [
    ('{"text": "ok"}\n{"text": "broken\n', "line 2: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"instruction": "x", "output": 3}\n', "line 1: field 'output' must be a string"),
    ('{"instruction": "x"}\n', "cannot tell the data format"),
    ("", "no examples (the file is empty)"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, tok, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_data(str(f), task="causal-lm", fmt="auto", tokenizer=tok, max_length=64)
    assert "bad.jsonl" in str(e.value) and needle in str(e.value)


def test_missing_alpaca_column(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"a.jsonl line 2: missing field 'output'"):
        load_data(str(f), task="causal-lm", fmt="alpaca", tokenizer=tok, max_length=64)


def test_classification_errors(tmp_path, tok):
    p = tmp_path / "c.tsv"
    p.write_text("text\tlabel\ngood\tpos\nbad\tneg\nmeh\tneutral\n")
    with pytest.raises(DataError, match=r"c.tsv line 4: unknown label 'neutral' \(expected one of: pos, neg"):
        load_data(str(p), task="classification", fmt="auto", tokenizer=tok, max_length=16, labels=["pos", "neg"])
    p.write_text("text\tlabel\ngood\tpos\nbad\n")
    with pytest.raises(DataError, match=r"c.tsv line 3: expected 2 fields"):
        read_records(str(p))
    p.write_text("review_text\tlabel\ngood\tpos\n")
    with pytest.raises(DataError, match=r"c.tsv line 2: missing text field"):
        load_data(str(p), task="classification", fmt="auto", tokenizer=tok, max_length=16, labels=["pos", "x"])
    p.write_text("text\tlabel\ngood\tpos\nfine\tpos\n")
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        infer_labels(read_records(str(p)), str(p))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: data file not found"):
        read_records(str(tmp_path / "nothere.jsonl"))
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.parquet'"):
        read_records(str(tmp_path / "x.parquet"))
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(str(tmp_path / "latin.jsonl"))


def test_format_task_mismatch(alpaca_file, tok):
    with pytest.raises(DataError, match="needs task=classification"):
        load_data(str(alpaca_file), task="causal-lm", fmt="classification", tokenizer=tok, max_length=64)


def test_truncation_that_removes_every_target_is_reported(alpaca_file, tok):
    with pytest.raises(DataError, match="no target token within data.max_length=8"):
        load_data(str(alpaca_file), task="causal-lm", fmt="alpaca", tokenizer=tok, max_length=8)


def test_json_array_file(tmp_path, tok):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "a b"}, {"text": "c"}]))
    assert len(load_data(str(f), task="causal-lm", fmt="auto", tokenizer=tok, max_length=16)) == 2


def test_collate_pads_right_and_masks_labels():
    b = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, 3, 0), epoch_order(50, 3, 1)
    assert sorted(a) == list(range(50)) and a != b and a == epoch_order(50, 3, 0)
    assert torch.tensor(a).unique().numel() == 50
