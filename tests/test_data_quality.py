"""`tunelab data check` and the cheap checks `tunelab train` runs: planted problems, found with their line numbers;
the bundled data sets, where nothing false may be reported."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import DATA, make_config, write_jsonl
from tunelab.data.quality import check_files, parse_rules, rules_met
from tunelab.errors import ConfigError, DataError

LONG = ("the acting was wonderful and the story kept me guessing until the very last scene of this long and "
        "careful film about a family that loses everything and finds it again")


def _rows(report, check, path=None):
    return [r for f in report.findings if f.check == check and (path is None or f.file == str(path)) for r in f.rows]


@pytest.fixture
def planted(tmp_path):
    """A training file and a test file with one of every problem, each on a known line."""
    train = [
        {"text": "a fine film", "label": "pos"},                                  # 1
        {"text": LONG, "label": "pos"},                                           # 2
        {"text": "A  FINE film", "label": "neg"},                                 # 3: duplicate of 1, other label
        {"text": LONG.replace("wonderful", "marvellous"), "label": "pos"},        # 4: near duplicate of 2
        {"text": "   ", "label": "neg"},                                          # 5: whitespace only
        {"text": "bad\x07film", "label": "neg"},                                  # 6: control character
        {"text": "cafÃ© food was awful", "label": "neg"},                         # 7: mojibake
        {"text": "dull and slow", "label": "neg"},                                # 8
        {"text": "a story told twice over with nothing new in it at all, sadly", "label": "meh"},  # 9: one-sided
    ]
    path = write_jsonl(tmp_path / "train.jsonl", train)
    with open(path, "ab") as f:
        f.write(b'{"text": "caf\xe9 latin-1 bytes", "label": "neg"}\n')          # 10: not UTF-8
    test = [
        {"text": "Dull and slow", "label": "neg"},                                # 1: leaks train line 8
        {"text": "an honest little film", "label": "pos"},                        # 2
        {"text": LONG.replace("guessing", "wondering"), "label": "pos"},          # 3: near leak of train 2
        {"text": "something else entirely", "label": "other"},                    # 4: label not in train
    ]
    return path, write_jsonl(tmp_path / "test.jsonl", test)


def test_every_planted_problem_is_found_with_its_line(planted):
    train, test = planted
    report = check_files([str(train)], str(test))
    assert _rows(report, "duplicates", train) == ["line 3 repeats line 1"]
    assert _rows(report, "conflicting_labels", train) == ["line 3 ('neg') repeats line 1 ('pos')"]
    assert [r.split(" (")[0] for r in _rows(report, "near_duplicates", train)] == ["line 4 ~ line 2"]
    assert _rows(report, "empty", train) == ["line 5: text empty"]
    assert _rows(report, "control_chars", train) == ["line 6: U+0007"]
    encoding = _rows(report, "encoding", train)
    assert len(encoding) == 2 and encoding[0].startswith("line 7: mojibake") and encoding[1] == "line 10: not valid UTF-8"
    leakage = _rows(report, "leakage", test)
    assert leakage[0] == "line 1 equals train.jsonl:8"
    assert leakage[1].startswith("line 3 ~ train.jsonl:2 (Jaccard 0.")
    assert len(leakage) == 2
    sided = _rows(report, "one_sided_labels")
    assert any("'meh'" in r and "none in test.jsonl" in r for r in sided)
    assert any("'other'" in r and "none checked" in r for r in sided)
    totals = report.totals()
    assert totals["duplicates"].count == 1 and totals["leakage"].count == 2 and totals["leakage"].total == 4


def test_clean_rows_raise_nothing(tmp_path):
    rows = [{"text": f"review number {i} says something different about film {i * 7}", "label": "ab"[i % 2]}
            for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30])
    test = write_jsonl(tmp_path / "test.jsonl", rows[30:])
    report = check_files([str(train)], str(test))
    assert {k: t.count for k, t in report.totals().items() if k != "imbalance"} == {k: 0 for k in report.totals()
                                                                                    if k != "imbalance"}


def test_instruction_rows_without_a_response(tmp_path, tiny_decoder):
    from transformers import AutoTokenizer

    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Say nothing.", "input": "", "output": "  "},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"instruction": "Write a long answer.", "input": "", "output": "word " * 300},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    report = check_files([str(path)], tokenizer=tok, model="tiny", max_length=64)
    assert report.files[0].kind == "instruction"
    assert _rows(report, "empty_outputs") == ["line 2: no response to learn", "line 3: no response to learn"]
    truncated = _rows(report, "truncated")
    assert len(truncated) == 1 and truncated[0].startswith("line 4: ")
    assert len(report.lengths[str(path)]) == 4


@pytest.mark.parametrize("text, expected", [
    ("duplicates>1%", [("duplicates", ">", 1.0, True)]),
    ("leakage>0, near_duplicates>=5", [("leakage", ">", 0.0, False), ("near_duplicates", ">=", 5.0, False)]),
    ("", []),
])
def test_rules_parse(text, expected):
    assert [(r.check, r.op, r.value, r.percent) for r in parse_rules(text)] == expected


@pytest.mark.parametrize("text, message", [
    ("dupes>1", "unknown check 'dupes'"),
    ("duplicates=1", "must look like NAME>VALUE"),
    ("leakage>1.2.3", "is not a number"),
])
def test_bad_rules_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_rules(text)


def test_rules_compare_counts_and_shares(planted):
    train, test = planted
    report = check_files([str(train)], str(test))
    assert rules_met(report, parse_rules("leakage>1")) == ["leakage>1 (found 2)"]
    assert rules_met(report, parse_rules("leakage>2,duplicates>20%")) == []
    assert rules_met(report, parse_rules("duplicates>5%"))[0].startswith("duplicates>5% (found 7.14% of 14 rows)")


def test_cli_exit_status_gates_a_pipeline(planted, tmp_path):
    train, test = planted
    run = [sys.executable, "-m", "tunelab", "data", "check", str(train), "--against", str(test), "--output", "out"]
    res = subprocess.run(run + ["--fail-on", "duplicates>1%,leakage>0"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert "data check failed: duplicates>1% (found 7.14% of 14 rows); leakage>0 (found 2)" in res.stderr
    assert "line 3 repeats line 1" in res.stdout
    saved = json.loads((tmp_path / "out" / "data_check.json").read_text())
    assert saved["rules_met"] and (tmp_path / "out" / "data_check.html").is_file()
    assert subprocess.run(run + ["--fail-on", "leakage>5"], cwd=tmp_path, capture_output=True).returncode == 0
    res = subprocess.run(run + ["--fail-on", "leak>0"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: rule 'leak>0': unknown check")


def test_train_warns_on_leakage_and_stops_when_asked(tmp_path, tiny_encoder):
    rows = [{"text": f"sentence {i} about films", "label": "ab"[i % 2]} for i in range(24)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2] + [{"text": "new one", "label": "a"}])
    raw = make_config(model={"name": tiny_encoder}, data={"train": "train.jsonl", "test": "test.jsonl"},
                      train={"max_steps": 1}, track={"enabled": False})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "tunelab", "train", "cfg.yaml"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "warning: data checks: leakage>0 (found 2)" in res.stderr and "test.jsonl: line 1 equals train.jsonl:1" in res.stderr
    res = subprocess.run(cmd + ["data.checks=stop", "output.name=stopped"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(data.checks: stop)" in res.stderr
    assert not (tmp_path / "runs" / "stopped").exists()


def test_quick_check_is_silent_on_clean_splits():
    from tunelab.config import DataConfig
    from tunelab.data.examples import load_splits
    from tunelab.data.quality import quick_check

    cfg = DataConfig(train=str(DATA / "imdb" / "train.jsonl"), test=str(DATA / "imdb" / "test.jsonl"))
    splits = load_splits(cfg, "classification", 42)
    report = quick_check(splits.train, [splits.test], "classification", cfg.train, [cfg.test])
    assert rules_met(report, parse_rules(cfg.check_rules)) == []


def test_unreadable_kind_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match="odd.jsonl:1: cannot tell the task from the fields"):
        check_files([str(path)])


# What the bundled data sets hold, exactly (data/README.md: deduplicated, no example shared between splits).
# Every near duplicate here was read by a person: real typo-variants, spam templates, SST-2 sub-phrases.
BUNDLED = {
    "trec": {"near_duplicates": 5, "leakage": 0},
    "sms_spam": {"near_duplicates": 45, "leakage": 20},
    "alpaca_2k": {"near_duplicates": 0, "leakage": 0},
}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_data_does_not_cry_wolf(name):
    report = check_files([str(DATA / name / "train.jsonl")], str(DATA / name / "test.jsonl"))
    totals = {k: t.count for k, t in report.totals().items()}
    for check in ("duplicates", "conflicting_labels", "empty", "control_chars", "encoding", "one_sided_labels",
                  "empty_outputs"):
        assert totals.get(check, 0) == 0, (check, _rows(report, check))
    for check, expected in BUNDLED[name].items():
        if expected is not None:
            assert totals[check] == expected, (check, _rows(report, check))
