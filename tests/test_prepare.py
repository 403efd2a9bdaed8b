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
    assert not (tmp_path / "out" / "sub" / "u.jsonl").exists()  # nothing kept from it: no output, not an empty one


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


# --- fault handling: corrupt files, missing columns, unwritable --out ---------------------------------

def corrupt_page(path):
    """Overwrite the second row group's first data page with garbage: the footer still reads, so the file
    opens and its first rows convert, then reading fails part-way (what a damaged download looks like)."""
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def truncate(path):
    """Cut a valid file in half: the footer is gone, so the file cannot be opened at all."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_two_groups(path, n=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([row(gt=str(i)) for i in range(n)]), path, row_group_size=n // 2)


@pytest.mark.parametrize("damage", [corrupt_page, truncate])
@pytest.mark.parametrize("single", [True, False])
def test_a_corrupt_file_leaves_an_existing_good_output_untouched(tmp_path, damage, single):
    src = tmp_path / "src" / "t.parquet"
    write_two_groups(src)
    out = tmp_path / ("o.jsonl" if single else "o")
    dest = out if single else out / "t.jsonl"
    prepare.prepare(src, out, log=lambda *_: None)
    good = dest.read_text()
    assert len(good.splitlines()) == 40
    damage(src)
    lines = []
    (report,) = prepare.prepare(src, out, log=lines.append)
    assert report.error and "cannot read parquet file" in report.error and report.kept == 0
    assert dest.read_text() == good  # the earlier good output survives
    assert not [p.name for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert any("left unchanged" in l and str(dest) in l for l in lines)


def test_one_corrupt_file_in_a_directory_is_named_and_the_rest_converted(tmp_path, capsys):
    src = tmp_path / "src"
    write(src / "a.parquet", [row()])
    write_two_groups(src / "b.parquet")
    corrupt_page(src / "b.parquet")
    write(src / "c.parquet", [row(source="wildguard", gt="harmful")])
    (src / "d.parquet").write_bytes(b"garbage, not parquet" * 10)
    assert prepare.main(["--src", str(src), "--out", str(tmp_path / "o")]) == 1  # non-zero at the end
    out = capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "o" / "a.jsonl")) == 1 and len(read_jsonl(tmp_path / "o" / "c.jsonl")) == 1
    assert not (tmp_path / "o" / "b.jsonl").exists() and not (tmp_path / "o" / "d.jsonl").exists()
    for name in ("b.parquet", "d.parquet"):
        (line,) = [l for l in out.splitlines() if l.startswith("SKIP") and name in l]
        assert "cannot read parquet file" in line
    # pyarrow's multi-line message is folded into that one line, not spilled over several
    assert all("parquet" in l for l in out.splitlines() if "Deserializing" in l or "thrift" in l)
    assert "total: kept 2," in out and "files not converted 2" in out


def test_a_missing_column_is_one_line_naming_it(tmp_path):
    no_question = [row(question=f"What is {i} + 1?") for i in range(30)]
    for r in no_question:
        del r["extra_info"]["single_turn_prompt"]
    write(tmp_path / "src" / "q.parquet", no_question)
    no_reward = [row() for _ in range(12)]
    for r in no_reward:
        del r["reward_model"]
    write(tmp_path / "src" / "r.parquet", no_reward)
    lines = []
    reports = prepare.prepare(tmp_path / "src", tmp_path / "o", log=lines.append)
    by_file = {r.path.split("/")[-1]: r for r in reports}
    assert (by_file["q.parquet"].kept, by_file["q.parquet"].skipped) == (0, 30)
    assert (by_file["r.parquet"].kept, by_file["r.parquet"].skipped) == (0, 12)
    skips = [l for l in lines if l.startswith("SKIP")]
    assert len(skips) == 2, skips
    (q,) = [l for l in skips if "q.parquet" in l]
    assert "extra_info.single_turn_prompt" in q and "30 rows" in q
    (r,) = [l for l in skips if "r.parquet" in l]
    assert "reward_model" in r and "12 rows" in r
    assert by_file["q.parquet"].error and by_file["r.parquet"].error  # a file-level failure, exit non-zero


def test_row_skip_lines_are_capped_per_file(tmp_path):
    write(tmp_path / "t.parquet", [row()] + [row(gt="") for _ in range(25)])
    lines = []
    (report,) = prepare.prepare(tmp_path / "t.parquet", tmp_path / "o.jsonl", log=lines.append)
    assert (report.kept, report.skipped, report.error) == (1, 25, None)
    skips = [l for l in lines if l.startswith("SKIP")]
    assert len(skips) == 11 and all("missing ground truth" in l for l in skips[:10])
    assert "row 10: missing ground truth" in skips[9] and "15 more" in skips[10]


@pytest.mark.parametrize("out_name", ["o.jsonl", "o"])
def test_an_unwritable_out_is_one_line_before_anything_is_converted(tmp_path, capsys, out_name):
    write(tmp_path / "t.parquet", [row(gt="")])  # would print a SKIP line if it were converted
    (tmp_path / "blocker").write_text("a file, not a directory")
    out = tmp_path / "blocker" / "sub" / out_name
    assert prepare.main(["--src", str(tmp_path / "t.parquet"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    (err,) = captured.err.splitlines()
    assert str(tmp_path / "blocker") in err and "--out" in err
    assert "SKIP" not in captured.out and "wrote" not in captured.out
    (tmp_path / "adir.jsonl").mkdir()  # a .jsonl --out that is a directory cannot be written either
    assert prepare.main(["--src", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "adir.jsonl")]) == 2
    assert "adir.jsonl" in capsys.readouterr().err


# --- a run that converts nothing never replaces an earlier good output ---------------------------------

@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("why", ["every row bad", "every row filtered out"])
def test_converting_nothing_leaves_an_earlier_good_output_untouched(tmp_path, capsys, single, why):
    src = tmp_path / "src" / "t.parquet"
    write(src, [row(), row(gt="12", question="What is 3 * 4?")])
    out = tmp_path / "out" / ("o.jsonl" if single else "o")
    dest = out if single else out / "t.jsonl"
    assert prepare.main(["--src", str(src), "--out", str(out)]) == 0
    good = dest.read_bytes()
    assert len(good.splitlines()) == 2
    if why == "every row bad":
        write(src, [row(gt=""), row(prompt=[])])
        argv = []
    else:
        argv = ["--sources", "wildguard"]
    capsys.readouterr()
    assert prepare.main(["--src", str(src), "--out", str(out)] + argv) == 1
    captured = capsys.readouterr()
    assert dest.read_bytes() == good  # the earlier good output survives
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # and no temporary file is left beside it
    assert f"not written: {dest} (no records kept" in captured.out and "existing file left unchanged" in captured.out
    assert "error: no records were written" in captured.err


def test_a_file_with_nothing_kept_writes_no_output_beside_the_others(tmp_path):
    write(tmp_path / "src" / "a.parquet", [row()])
    write(tmp_path / "src" / "b.parquet", [row(gt="")])
    lines = []
    reports = prepare.prepare(tmp_path / "src", tmp_path / "o", log=lines.append)
    assert [(r.kept, r.skipped) for r in reports] == [(1, 0), (0, 1)]
    assert len(read_jsonl(tmp_path / "o" / "a.jsonl")) == 1 and not (tmp_path / "o" / "b.jsonl").exists()
    assert any(l.startswith(f"not written: {tmp_path / 'o' / 'b.jsonl'} (no records kept") for l in lines)


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_old_output(tmp_path, monkeypatch):
    write(tmp_path / "t.parquet", [row()])
    out = tmp_path / "o.jsonl"
    out.write_text("the earlier output\n")

    def full_disk(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare.prepare(tmp_path / "t.parquet", out, log=lambda *_: None)
    assert out.read_text() == "the earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "t.parquet"]  # no temporary file left


# --- rows a reader can hand over that JSON cannot hold: one SKIP line each, never a traceback --------------

def nested(depth):
    value = "deep"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("change,words", [
    (lambda r: r.update(reward_model=[1]), "reward_model must be an object with a ground_truth, got list"),
    (lambda r: r.update(reward_model="85"), "reward_model must be an object with a ground_truth, got str"),
    (lambda r: r.update(extra_info=[1]), "extra_info must be an object, got list"),
    (lambda r: r["extra_info"].update(index=int("9" * 4000) ** 2), "extra_info.index is an integer of 26576 bits"),
    (lambda r: r["extra_info"].update(deep=nested(100_000)), "extra_info.deep" + "[0]" * 62 + " is nested more than 64"),
    (lambda r: r["extra_info"].update(deep={"a": nested(100)}), "is nested more than 64 levels deep"),
    (lambda r: r.update(prompt="What is 37 + 48?"), "missing or empty messages (prompt is str)"),
    (lambda r: r.update(data_source=["math-hard"]), "unknown data_source ['math-hard']"),
])
def test_rows_json_cannot_hold_are_bad_rows(change, words):
    r = row()
    change(r)
    with pytest.raises(prepare.RowError) as e:
        prepare.convert_row(r)
    assert words in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400
    rec, _ = prepare.convert_row({**row(), "extra_info": {**row()["extra_info"], "deep": nested(62)}})
    assert json.loads(json.dumps(rec)) == rec  # 64 levels in all is still a record


def test_a_parquet_column_nested_too_deep_for_pyarrow_is_one_skip_file_line(tmp_path):
    # parquet itself limits nesting (pyarrow: a schema 100 nodes deep, about 50 lists): such a file is one
    # SKIP FILE line naming it, and an earlier output stays
    kind = pa.string()
    for _ in range(70):
        kind = pa.list_(kind)
    schema = pa.Table.from_pylist([row()]).schema.append(pa.field("deep", kind))
    write(tmp_path / "t.parquet", [{**row(), "deep": nested(70)}], schema=schema)
    lines = []
    (report,) = prepare.prepare(tmp_path / "t.parquet", tmp_path / "o.jsonl", log=lines.append)
    assert report.kept == 0 and "cannot read parquet file" in report.error and "nested" in report.error
    (skip,) = [l for l in lines if l.startswith("SKIP")]
    assert skip.startswith(f"SKIP FILE {tmp_path / 't.parquet'}: cannot read parquet file") and "\n" not in skip
