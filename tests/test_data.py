"""data.py: the seeded, stratified subset (eval.py --limit, train.py --eval-size) and the per-source report of
prompts dropped for length, on hand-made records with hand-counted answers.

Run: python -m pytest tests/test_data.py -q
"""
from collections import Counter

import pytest

from nano_gtalign.data import (
    SourceDrops, drop_report, drop_warnings, encode_prompts, encode_prompts_report, format_drop_report,
    require_prompts, stratified_subset,
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
