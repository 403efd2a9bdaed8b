"""data/gtalign/prepare.py: fixture parquet files in the published shape -> JSONL records."""
import json
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write the fixture parquet files (CI installs it)")
import pyarrow.parquet as pq  # noqa: E402

from data.gtalign import prepare  # noqa: E402

SYSTEM = {"role": "system", "content": "You are helpful."}


def row(source="math-hard", gt="85", question="What is 37 + 48?", prompt=None, **extra):
    extra_info = {
        "adversarial": None,
        "chat_history": [{"role": "user", "content": question}],
        "index": 7,
        "single_turn_completion": gt,
        "single_turn_prompt": question,
        "split": "test",
    }
    extra_info.update(extra)
    return {
        "prompt": [SYSTEM, {"role": "user", "content": "Four blocks please. Question: " + question}] if prompt is None else prompt,
        "adversarial": False,
        "source": source,
        "turn_id": 1,
        "data_source": source,
        "ability": source,
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": extra_info,
    }


def write(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_good_rows_keep_every_field(tmp_path):
    write(tmp_path / "src" / "math-hard" / "test.parquet", [row(), row(gt="12", question="What is 3 * 4?")])
    reports = prepare.prepare(tmp_path / "src", tmp_path / "out.jsonl", log=lambda *_: None)
    recs = read_jsonl(tmp_path / "out.jsonl")
    assert [r.kept for r in reports] == [2] and reports[0].skipped == 0
    assert recs[0] == row()  # nothing lost, nothing renamed
    assert recs[1]["reward_model"]["ground_truth"] == "12"
    assert recs[1]["extra_info"]["chat_history"] == [{"role": "user", "content": "What is 3 * 4?"}]


def test_abg_coqa_is_renamed_and_absent_fields_are_null(tmp_path):
    # The published abg-coqa file has no chat_history / single_turn_completion columns.
    r = row(source="abg-coqa", gt="ambiguous", question="Context: ... Who is she?")
    r["extra_info"] = {"ground_truth": "ambiguous", "single_turn_prompt": "Context: ... Who is she?"}
    write(tmp_path / "abg.parquet", [r])
    reports = prepare.prepare(tmp_path / "abg.parquet", tmp_path / "o.jsonl", log=lambda *_: None)
    (rec,) = read_jsonl(tmp_path / "o.jsonl")
    assert rec["data_source"] == "abg_coqa" and rec["source"] == "abg-coqa"
    assert rec["extra_info"] == {"ground_truth": "ambiguous", "single_turn_prompt": "Context: ... Who is she?",
                                 "chat_history": None, "single_turn_completion": None}
    assert reports[0].notes["extra_info.chat_history absent (written as null)"] == 1


def test_bad_rows_are_reported_with_index_and_counted(tmp_path):
    rows = [
        row(),                                    # 0 good
        row(source="gsm8k"),                      # 1 unknown data_source
        row(gt=""),                               # 2 missing ground truth
        row(prompt=[]),                           # 3 empty messages
        row(prompt=[SYSTEM, {"role": "user", "content": "  "}]),  # 4 empty message content
        row(single_turn_prompt=""),               # 5 no question
        row(source="wildguard", gt="harmful"),    # 6 good
    ]
    write(tmp_path / "t.parquet", rows)
    rows_null = [row(), row()]
    rows_null[1]["prompt"] = None
    rows_null[0]["reward_model"] = None
    write(tmp_path / "sub" / "u.parquet", rows_null)
    lines = []
    reports = prepare.prepare(tmp_path, tmp_path / "out", log=lines.append)
    by_file = {r.path.split("/")[-1]: r for r in reports}
    assert (by_file["t.parquet"].kept, by_file["t.parquet"].skipped) == (2, 5)
    assert (by_file["u.parquet"].kept, by_file["u.parquet"].skipped) == (0, 2)
    skips = [l for l in lines if l.startswith("SKIP")]
    assert len(skips) == 7
    assert any("t.parquet row 1: unknown data_source 'gsm8k'" in l for l in skips)
    assert any("t.parquet row 2: missing ground truth" in l for l in skips)
    assert any("t.parquet row 3: missing or empty messages" in l for l in skips)
    assert any("t.parquet row 4: prompt[1] (user) has empty content" in l for l in skips)
    assert any("t.parquet row 5: missing extra_info.single_turn_prompt" in l for l in skips)
    assert any("u.parquet row 0: missing ground truth" in l for l in skips)
    assert any("u.parquet row 1: missing messages" in l for l in skips)
    # Directory output mirrors the tree.
    assert [r["data_source"] for r in read_jsonl(tmp_path / "out" / "t.jsonl")] == ["math-hard", "wildguard"]
    assert (tmp_path / "out" / "sub" / "u.jsonl").read_text() == ""


def test_sources_and_split_filters(tmp_path):
    write(tmp_path / "a" / "test.parquet", [row(), row(source="wildguard", gt="harmful")])
    write(tmp_path / "a" / "train.parquet", [row()])
    reports = prepare.prepare(tmp_path, tmp_path / "o.jsonl", sources=prepare.parse_sources("wildguard"),
                              split="test", log=lambda *_: None)
    assert [(r.kept, r.filtered) for r in reports] == [(1, 1)]
    assert [r["data_source"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["wildguard"]
    assert prepare.parse_sources("abg-coqa, minerva") == {"abg_coqa", "minerva"}
    with pytest.raises(ValueError, match="unknown data source.*gsm8k"):
        prepare.parse_sources("math-hard,gsm8k")


def test_numpy_values_become_json_lists():
    # What a pandas-based reader hands over: messages as an object ndarray, numpy ints.
    r = row()
    r["prompt"] = np.array(r["prompt"], dtype=object)
    r["turn_id"] = np.int64(3)
    r["extra_info"]["chat_history"] = np.array(r["extra_info"]["chat_history"], dtype=object)
    rec, notes = prepare.convert_row(r)
    assert json.loads(json.dumps(rec)) == rec
    assert rec["prompt"] == row()["prompt"] and rec["turn_id"] == 3 and notes == []
    bad = row()
    bad["extra_info"]["score"] = float("nan")
    with pytest.raises(prepare.RowError, match="extra_info.score is nan"):
        prepare.convert_row(bad)


def test_cli_summary_and_exit_codes(tmp_path, capsys):
    write(tmp_path / "t.parquet", [row(), row(gt="")])
    assert prepare.main(["--src", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "SKIP" in out and "row 1: missing ground truth" in out
    assert "total: kept 1, skipped 1" in out and "kept per data_source: math-hard 1" in out
    assert prepare.main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write(tmp_path / "empty" / "t.parquet", [row(gt="")])
    assert prepare.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "e.jsonl")]) == 1
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.parquet").write_text("not parquet")
    assert prepare.main(["--src", str(tmp_path / "broken"), "--out", str(tmp_path / "b.jsonl")]) == 1
    assert "cannot read parquet file" in capsys.readouterr().out


def test_missing_pyarrow_is_a_clear_message(tmp_path, monkeypatch):
    write(tmp_path / "t.parquet", [row()])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails
    with pytest.raises(SystemExit, match="needs pyarrow"):
        prepare.prepare(tmp_path / "t.parquet", tmp_path / "o.jsonl", log=lambda *_: None)
