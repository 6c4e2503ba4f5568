import json

import pytest

from tunelab.config import DataConfig
from tunelab.data.batching import batch_plan, collate
from tunelab.data.examples import load_splits
from tunelab.data.tokenize import head_tail, tokenize_instruction
from tunelab.errors import DataError

from conftest import write_jsonl

ROWS = [{"text": f"review number {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]


def _cfg(tmp_path, train_rows=ROWS, test_rows=None, **kw):
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows) if test_rows is not None else None
    return DataConfig(train=str(train), test=str(test) if test else None, **kw)


def _raw(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return DataConfig(train=str(path))


# Every validation error: (file name, bytes, expected message). Each must name the file and, where there is one, the line.
BAD_FILES = [
    ("bad.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": \n', r"bad.jsonl:2: invalid JSON"),
    ("latin1.jsonl", b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n',
     r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    ("missing.jsonl", b'{"text": "a", "label": "x"}\n{"review": "b", "label": "y"}\n',
     r"missing.jsonl:2: field 'text' is missing \(found: review, label\); set data.columns.text"),
    ("empty_field.jsonl", b'{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n',
     r"empty_field.jsonl:2: field 'text' is empty"),
    ("wrong_type.jsonl", b'{"text": "a", "label": "x"}\n{"text": 5, "label": "y"}\n',
     r"wrong_type.jsonl:2: field 'text' must be a string, got int"),
    ("empty.jsonl", b"", r"empty.jsonl: file is empty"),
    ("list.jsonl", b'["text", "label"]\n', r"list.jsonl:1: expected a JSON object, got list"),
    ("bad.csv", b"text,label\nfine,x\n\xff\xfe,y\n", r"bad.csv:3: not valid UTF-8"),
    ("wide.csv", b"text,label\nfine,x\ntoo,many,values\n", r"wide.csv:3: more values than the 2 header columns"),
    ("data.txt", b"hello\n", r"data.txt: unsupported file type '.txt'"),
]


@pytest.mark.parametrize("name, content, expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_files_name_file_line_and_field(tmp_path, name, content, expected):
    with pytest.raises(DataError, match=expected) as err:
        load_splits(_raw(tmp_path, name, content), "classification", seed=0)
    assert "\n" not in str(err.value)


def test_single_class_train_is_refused(tmp_path):
    rows = [{"text": f"t{i}", "label": "positive"} for i in range(10)]
    with pytest.raises(DataError, match="all 10 training examples have label 'positive'"):
        load_splits(_cfg(tmp_path, rows), "classification", seed=0)


def test_test_label_never_seen_in_training(tmp_path):
    test = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}]
    with pytest.raises(DataError, match=r"test.jsonl:2: label 'neutral' never appears in the training data"):
        load_splits(_cfg(tmp_path, test_rows=test), "classification", seed=0)


def test_seeded_subset_is_random_not_the_file_head(tmp_path):
    # A label-sorted file: the first 20 lines are all "neg". train[:20] would be single-class.
    rows = sorted(ROWS, key=lambda r: r["label"])
    splits = load_splits(_cfg(tmp_path, rows, max_train_samples=20), "classification", seed=0)
    assert {ex["label"] for ex in splits.train} == {"neg", "pos"}
    again = load_splits(_cfg(tmp_path, rows, max_train_samples=20), "classification", seed=0)
    assert [ex["text"] for ex in splits.train] == [ex["text"] for ex in again.train]


def test_stratified_validation_split(tmp_path):
    splits = load_splits(_cfg(tmp_path, validation_split=0.25), "classification", seed=0)
    assert len(splits.validation) == 10 and len(splits.train) == 30
    assert sorted(ex["label"] for ex in splits.validation).count("pos") == 5
    assert not {ex["text"] for ex in splits.train} & {ex["text"] for ex in splits.validation}


def test_column_mapping_csv_and_integer_labels(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("review,sentiment\n" + "".join(f'"text, {i}",{i % 2}\n' for i in range(6)))
    cfg = DataConfig(train=str(path), columns={"text": "review", "label": "sentiment"})
    splits = load_splits(cfg, "classification", seed=0)
    assert splits.labels == ["0", "1"]
    assert splits.train[0]["text"].startswith("text, ")


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:6]), path)
    assert len(load_splits(DataConfig(train=str(path)), "classification", seed=0).train) == 6
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": None}, {"text": "b", "label": "x"}]), path)
    with pytest.raises(DataError, match=r"d.parquet:row 1: field 'label' is missing"):
        load_splits(DataConfig(train=str(path)), "classification", seed=0)


def test_instruction_messages_are_validated(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[1\] must be an object with 'role'"):
        load_splits(_cfg(tmp_path, rows), "instruction", seed=0)
    rows = [{"instruction": "Say hi", "input": "", "output": ""}]
    with pytest.raises(DataError, match="field 'output' is empty"):
        load_splits(_cfg(tmp_path, rows), "instruction", seed=0)


def test_batch_plan_is_deterministic_complete_and_grouped():
    lengths = [(i * 37) % 200 + 1 for i in range(500)]
    plan = batch_plan(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert plan == batch_plan(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert plan != batch_plan(lengths, 8, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in plan for i in b) == list(range(500))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    random_plan = batch_plan(lengths, 8, seed=1, epoch=0, group_by_length=False)
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_plan)
    assert padded < 0.7 * padded_random  # grouping must cut padding substantially


def test_collate_pads_right_to_multiple_of_8_and_masks_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [1], "labels": [1]}], pad_id=2)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [1] + [-100] * 7


def test_head_tail_truncation_keeps_both_ends():
    ids = list(range(100))
    out = head_tail(ids, 20)
    assert len(out) == 20 and out[:5] == [0, 1, 2, 3, 4] and out[-15:] == list(range(85, 100))


def test_instruction_labels_train_response_and_eos_not_prompt(tiny_decoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    assert tok.pad_token_id == tok.eos_token_id  # the SmolLM2 pitfall this test guards
    ex = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    (feat,), truncated = tokenize_instruction([ex], tok, 256, "chat")
    ids, labels = feat["input_ids"], feat["labels"]
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # EOS is trained despite pad == eos
    assert tok.decode([ids[i] for i in trained[:-1]]) == "Blue."
    assert "Name a colour." in tok.decode(ids[: trained[0]])
    assert truncated == 0
    (alpaca,), _ = tokenize_instruction([ex], tok, 256, "alpaca")
    assert "### Response:" in tok.decode(alpaca["input_ids"])


def test_jsonl_with_a_byte_order_mark_reads_like_without(tmp_path):
    """Windows editors start UTF-8 files with a BOM; the CSV reader always skipped it, the JSONL one now does."""
    plain = write_jsonl(tmp_path / "plain.jsonl", ROWS[:6]).read_bytes()
    bom = _raw(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + plain)
    splits = load_splits(bom, "classification", seed=0)
    assert sorted(ex["text"] for ex in splits.train) == sorted(r["text"] for r in ROWS[:6])
    # Only at the start of the file: a BOM inside a later line is still an error, with its line.
    with pytest.raises(DataError, match=r"inner.jsonl:2: invalid JSON"):
        first, rest = plain.split(b"\n", 1)
        load_splits(_raw(tmp_path, "inner.jsonl", first + b"\n\xef\xbb\xbf" + rest), "classification", 0)


def test_json_array_file_is_read_with_each_objects_line(tmp_path):
    text = "\ufeff[\n" + ",\n".join("  " + json.dumps(r) for r in ROWS[:6]) + "\n]\n"
    splits = load_splits(_raw(tmp_path, "rows.json", text.encode()), "classification", seed=0)
    assert sorted(ex["text"] for ex in splits.train) == sorted(r["text"] for r in ROWS[:6])
    assert {ex["where"] for ex in splits.train} == {f"{tmp_path / 'rows.json'}:{n}" for n in range(2, 8)}
    # A .json file of one object per line is still JSON Lines.
    lines = write_jsonl(tmp_path / "lines.json", ROWS[:6])
    assert len(load_splits(DataConfig(train=str(lines)), "classification", seed=0).train) == 6


@pytest.mark.parametrize("content, expected", [
    (b'[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]', r"arr.json:2: invalid JSON in the array"),
    (b'[{"text": "a", "label": "x"},\n "just a string"]', r"arr.json:2: expected a JSON object in the array, got str"),
    (b'[{"text": "a", "label": "x"}]\n{"text": "b"}', r"arr.json:2: text after the JSON array"),
    (b'[{"text": "a", "label": "x"}\n\n {"text": "b", "label": "y"}]', r"arr.json:3: invalid JSON in the array"),
    (b'[{"text": "a", "label": "x"},\n {"text": "caf\xe9", "label": "y"}]', r"arr.json:2: not valid UTF-8 \(byte 0xe9"),
    # A pretty-printed single object is neither format: the error says what a .json file may hold.
    (b'{\n  "text": "a",\n  "label": "x"\n}\n', r"arr.json:1: invalid JSON .*one JSON array of objects or one object "
                                             r"per line \(JSON Lines\)"),
])
def test_bad_json_files_say_line_and_format(tmp_path, content, expected):
    with pytest.raises(DataError, match=expected) as err:
        load_splits(_raw(tmp_path, "arr.json", content), "classification", seed=0)
    assert "\n" not in str(err.value)


def test_boolean_labels_are_kept_as_written(tmp_path):
    """`true`/`false` are class names as written, as they are in a CSV; never the "1"/"0" of str(int(True))."""
    rows = [{"text": f"t{i}", "label": i % 2 == 0} for i in range(6)]
    splits = load_splits(_cfg(tmp_path, rows), "classification", seed=0)
    assert splits.labels == ["false", "true"]
    assert {ex["text"]: ex["label"] for ex in splits.train}["t0"] == "true"
    csv = tmp_path / "b.csv"
    csv.write_text("text,label\n" + "".join(f"t{i},{str(i % 2 == 0).lower()}\n" for i in range(6)))
    assert load_splits(DataConfig(train=str(csv)), "classification", seed=0).labels == ["false", "true"]
    # A file mixing JSON true and 1 keeps them apart: two spellings are two classes, not silently one.
    mixed = load_splits(_cfg(tmp_path, [{"text": "a", "label": True}, {"text": "b", "label": 1}]), "classification", 0)
    assert mixed.labels == ["1", "true"]


@pytest.mark.parametrize("name", ["big.jsonl", "big.json"])
def test_a_line_over_the_size_cap_is_one_line_naming_file_and_line(tmp_path, monkeypatch, name):
    from tunelab.data import sources

    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 200)
    fine = json.dumps({"text": "a" * 100, "label": "x"})
    huge = json.dumps({"text": "b" * 300, "label": "y"})
    content = f"{fine}\n{huge}\n{fine}\n" if name.endswith("l") else f"[{fine},\n{huge}]"
    with pytest.raises(DataError, match=rf"{name}:2: record is over 200 bytes") as err:
        load_splits(_raw(tmp_path, name, content.encode()), "classification", seed=0)
    assert "\n" not in str(err.value)
    # Under the cap, the same records read.
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 400)
    assert len(load_splits(_raw(tmp_path, name, content.encode()), "classification", seed=0).train) >= 2
