"""data.py: the seeded, stratified subset (eval.py --limit, train.py --eval-size) and the per-source report of
prompts dropped for length, on hand-made records with hand-counted answers; reading records, where every bad
line or row (a wrong type, a huge integer, deep nesting) is one error naming the file and line.

Run: python -m pytest tests/test_data.py -q
"""
import json
from collections import Counter

import pytest

from nano_gtalign.data import (
    SourceDrops, check_record, drop_report, drop_warnings, encode_prompts, encode_prompts_report, format_drop_report,
    read_records, read_records_at, require_prompts, stratified_subset,
)
from nano_gtalign.errors import UsageError


def rec(source: str, i: int, words: int = 1) -> dict:
    text = " ".join([f"q{i}"] * words)
    return {"prompt": [{"role": "user", "content": text}], "data_source": source,
            "reward_model": {"ground_truth": "1"}, "i": i}


# 60 math-hard, 30 wildguard, 9 medium, 1 minerva, interleaved the way a concatenated file is not
MIX = ([rec("math-hard", i) for i in range(60)] + [rec("wildguard", 100 + i) for i in range(30)]
       + [rec("medium", 200 + i) for i in range(9)] + [rec("minerva", 300)])


def counts(records):
    return Counter(r["data_source"] for r in records)


# ---------------------------------------------------------------- stratified_subset

def test_proportional_with_every_source_represented():
    # one each first (4), then the other 16 shared by largest remainder of 16 * (size - 1) / 96:
    # math-hard 9.83, wildguard 4.83, medium 1.33, minerva 0 -> 9, 4, 1, 0 and the 2 left go to the two .83s
    sub = stratified_subset(MIX, 20, seed=0)
    assert counts(sub) == {"math-hard": 11, "wildguard": 6, "medium": 2, "minerva": 1}
    assert len({r["i"] for r in sub}) == 20
    # in the file's order, so a subset reads like the file
    assert [r["i"] for r in sub] == sorted(r["i"] for r in sub)


def test_deterministic_seeded_and_not_the_first_n():
    a, b = stratified_subset(MIX, 20, seed=0), stratified_subset(MIX, 20, seed=0)
    assert a == b
    c = stratified_subset(MIX, 20, seed=1)
    assert counts(c) == counts(a) and [r["i"] for r in c] != [r["i"] for r in a]
    firsts = [r["i"] for r in a if r["data_source"] == "math-hard"]
    assert firsts != list(range(11))  # drawn, not the first 11 of the source


def test_fewer_than_the_sources_takes_the_largest():
    assert counts(stratified_subset(MIX, 2, seed=0)) == {"math-hard": 1, "wildguard": 1}
    assert counts(stratified_subset(MIX, 4, seed=3)) == {"math-hard": 1, "wildguard": 1, "medium": 1, "minerva": 1}


def test_n_at_least_all_returns_everything_in_order():
    assert stratified_subset(MIX, 100, seed=5) == MIX
    assert stratified_subset(MIX, 1000, seed=5) == MIX
    assert stratified_subset([], 3, seed=0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        stratified_subset(MIX, -1, seed=0)


def test_one_source_is_a_seeded_sample():
    only = [rec("math-hard", i) for i in range(50)]
    sub = stratified_subset(only, 7, seed=2)
    assert len(sub) == 7 and sub == stratified_subset(only, 7, seed=2)
    assert {r["i"] for r in sub} != set(range(7))


# ---------------------------------------------------------------- drop report

class WordTokenizer:
    """One token per whitespace word of the joined messages: lengths are easy to count by hand."""

    def encode_chat(self, messages):
        return [0] * sum(len(m["content"].split()) for m in messages)


def test_drop_report_by_hand():
    records = [rec("math-hard", 0, 3), rec("math-hard", 1, 12), rec("wildguard", 2, 5),
               rec("wildguard", 3, 40), rec("wildguard", 4, 11), rec("medium", 5, 2)]
    report = drop_report(records, [3, 12, 5, 40, 11, 2], max_tokens=10)
    assert report == {"math-hard": SourceDrops(kept=1, dropped=1, longest=12),
                      "medium": SourceDrops(kept=1, dropped=0, longest=2),
                      "wildguard": SourceDrops(kept=1, dropped=2, longest=40)}
    assert list(report) == ["math-hard", "medium", "wildguard"]  # sorted
    line = format_drop_report(report, 10, "train")
    assert "\n" not in line
    assert line == ("train prompts dropped over 10 tokens: 3 of 6; math-hard 1 of 2 (longest 12), "
                    "medium 0 of 1 (longest 2), wildguard 2 of 3 (longest 40)")
    warnings = drop_warnings(report, 10)
    assert warnings == ["wildguard loses 2 of its 3 prompts (67%) to the 10-token prompt limit; its longest "
                        "prompt is 40 tokens"]
    assert drop_warnings(report, 10, most=0.4) == [  # math-hard loses exactly half
        "math-hard loses 1 of its 2 prompts (50%) to the 10-token prompt limit; its longest prompt is 12 tokens",
        warnings[0]]
    with pytest.raises(ValueError, match="3 lengths for 2 records"):
        drop_report(records[:2], [1, 2, 3], max_tokens=10)


def test_encode_prompts_report_keeps_encode_prompts_as_it_was():
    records = [rec("math-hard", 0, 3), rec("math-hard", 1, 12), rec("wildguard", 2, 5)]
    kept, ids, report = encode_prompts_report(records, WordTokenizer(), max_tokens=10)
    assert [r["i"] for r in kept] == [0, 2] and [len(x) for x in ids] == [3, 5]
    assert report == {"math-hard": SourceDrops(1, 1, 12), "wildguard": SourceDrops(1, 0, 5)}
    assert encode_prompts(records, WordTokenizer(), 10) == (kept, ids, 1)


def test_require_prompts_says_when_the_prompts_are_too_long():
    report = {"math-hard": SourceDrops(kept=2, dropped=8, longest=900), "medium": SourceDrops(0, 5, 3000)}
    with pytest.raises(UsageError) as e:
        require_prompts(report, 4, "training", max_tokens=512, hint="raise --max-prompt-tokens")
    msg = str(e.value)
    assert "\n" not in msg and "fewer than --prompts-per-step" not in msg
    assert msg == ("training: only 2 of 15 prompts fit in 512 tokens, 4 needed (the rest are longer: math-hard "
                   "up to 900 tokens, medium up to 3000); raise --max-prompt-tokens")
    with pytest.raises(UsageError, match="^evaluation: no prompts fit in 512 tokens, 1 needed"):
        require_prompts({"medium": SourceDrops(0, 5, 3000)}, 1, "evaluation", max_tokens=512)
    with pytest.raises(UsageError, match="^training: 3 prompts, 4 needed$"):
        require_prompts({"math-hard": SourceDrops(3, 0, 20)}, 4, "training", max_tokens=512)
    require_prompts(report, 2, "training", max_tokens=512)  # enough: nothing raised


# ---------------------------------------------------------------- reading records: every fault one file:line line

GOOD = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}],
        "data_source": "math-hard", "reward_model": {"ground_truth": "2"},
        "extra_info": {"single_turn_prompt": "What is 1 + 1?", "chat_history": None, "index": 3}}


def with_field(path: str, value) -> str:
    """GOOD as a JSON line with the dotted field `path` set to `value` (a str value is spliced in raw)."""
    record = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    target = record
    for key in parents:
        target = target[key]
    target[last] = "@@RAW@@"
    raw = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(record).replace('"@@RAW@@"', raw)


DEEP = "[" * 100_000 + "]" * 100_000
BAD_LINES = {
    # the probe's three
    "reward_model is a list": (with_field("reward_model", [1]), "reward_model must be an object with a ground_truth, got list"),
    "a 5,000-digit integer": (with_field("extra_info.index", "9" * 5000), "an integer of more than 4300 digits"),
    "100,000-deep nesting": (with_field("extra_info.x", DEEP), "nested more than 64 levels deep"),
    # the same classes one step off: a negative huge integer, deep nesting that json still parses, in objects
    "a negative 5,000-digit integer": (with_field("extra_info.index", "-" + "1" * 5000), "more than 4300 digits"),
    "200-deep nesting": (with_field("extra_info.x", "[" * 200 + "]" * 200), "extra_info.x" + "[0]" * 62 + " is nested more than 64"),
    "deep objects": (with_field("extra_info.x", '{"a": ' * 100_000 + "1" + "}" * 100_000), "nested more than 64 levels"),
    # the type of every field a record is read by
    "reward_model is a string": (with_field("reward_model", '"2"'), "reward_model must be an object with a ground_truth, got str"),
    "reward_model is null": (with_field("reward_model", None), "reward_model must be an object with a ground_truth, got null"),
    "ground_truth a number": (with_field("reward_model.ground_truth", 2), "reward_model.ground_truth must be a string, got int"),
    "prompt is a string": (with_field("prompt", '"hi"'), "'prompt' must be a non-empty list"),
    "a message is a list": (with_field("prompt", [["user", "hi"]]), "'prompt' must be a non-empty list"),
    "content is a number": (with_field("prompt", [{"role": "user", "content": 7}]), "'prompt' must be a non-empty list"),
    "data_source a list": (with_field("data_source", ["math-hard"]), "unknown data_source ['math-hard']"),
    "extra_info a list": (with_field("extra_info", [1]), "extra_info must be an object, got list"),
    "chat_history a number": (with_field("extra_info.chat_history", 5),
                              "extra_info.chat_history must be a list of {role, content} chat messages or null, got int"),
    "chat_history of strings": (with_field("extra_info.chat_history", ["hi"]), "extra_info.chat_history must be a list"),
    "single_turn_prompt a list": (with_field("extra_info.single_turn_prompt", ["q"]),
                                  "extra_info.single_turn_prompt must be a string or null, got list"),
    # not a record at all
    "a list": ("[1, 2]", "a record must be a JSON object, got list"),
    "broken JSON": ('{"prompt": ', "not valid JSON"),
    "NUL byte": ('{"prompt": "\x00"}', "not valid JSON"),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_a_bad_jsonl_record_is_one_line_naming_file_and_line(tmp_path, name):
    line, words = BAD_LINES[name]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(UsageError) as e:
        read_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and "\n" not in msg and len(msg) < 400, msg
    assert words in msg


def test_good_records_and_their_optional_fields_are_read(tmp_path):
    optional = [GOOD, {k: v for k, v in GOOD.items() if k != "extra_info"}, {**GOOD, "extra_info": None},
                {**GOOD, "extra_info": {"chat_history": [{"role": "user", "content": "q"}], "single_turn_prompt": None}},
                # 64 levels in all is still a record; 4300 digits is still a number
                json.loads(with_field("extra_info.x", "[" * 62 + "]" * 62)), json.loads(with_field("extra_info.n", "7" * 4300))]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in optional))
    assert read_records(path) == optional
    for i, (where, r) in enumerate(read_records_at(path), 1):
        assert where == f"{path}:{i}" and r == optional[i - 1]


def test_a_bad_parquet_record_or_file_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = {k: v for k, v in GOOD.items() if k != "extra_info"}
    pq.write_table(pa.Table.from_pylist([good, {**good, "reward_model": None}]), tmp_path / "r.parquet")
    with pytest.raises(UsageError, match=r"r.parquet row 1: reward_model must be an object with a ground_truth, got null$"):
        read_records(tmp_path / "r.parquet")
    pq.write_table(pa.Table.from_pylist([{**good, "blob": b"\x00\xff"}]), tmp_path / "b.parquet")
    with pytest.raises(UsageError, match=r"b.parquet row 0: blob is bytes, not a JSON value"):
        read_records(tmp_path / "b.parquet")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UsageError) as e:
        read_records(tmp_path / "x.parquet")
    assert str(e.value).startswith(f"{tmp_path / 'x.parquet'}: cannot read parquet file: ") and "\n" not in str(e.value)


def test_check_record_refuses_values_json_cannot_hold(tmp_path):
    # what a parquet or pandas reader may hand over instead of JSON values, and cycles, are refused by name
    loop: list = []
    loop.append(loop)
    for value, words in ((float("nan"), None), (b"x", "is bytes"), ({1: "a"}, "has a key 1 that is not a string"),
                         (loop, "nested more than 64 levels deep"), (10 ** 5000, "more than 4300 digits")):
        record = {**GOOD, "extra_info": {"v": value}}
        if words is None:
            check_record(record, "f:1")  # NaN is a number here, as json.loads reads it
            continue
        with pytest.raises(UsageError, match=f"^f:1: extra_info.v.*{words}"):
            check_record(record, "f:1")
