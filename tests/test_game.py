"""Tests for nano_gtalign/game.py: payoff parsing, the four blocks, Pareto frontier and choices.

    python -m pytest tests/test_game.py -q
"""
import json
import math
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from nano_gtalign.game import (
    KEYS, MAX_PAYOFF_CHARS, PayoffError, analyze_choice, choice_on_frontier, choose_action,
    cobb_douglas, format_ok, format_payoff, pareto_consistency, pareto_frontier, parse_payoff,
    split_blocks, welfare_sum,
)

PAYOFF = ('{"DQ_AQ": {"LLM": 2.2, "user": 1.9}, "DQ_CQ": {"LLM": 3.1, "user": 3.5}, '
          '"DQ_DA": {"LLM": 4.2, "user": 4.3}, "VQ_AQ": {"LLM": 2.0, "user": 2.1}, '
          '"VQ_CQ": {"LLM": 1.3, "user": 1.2}, "VQ_DA": {"LLM": 2.0, "user": 1.8}}')
MATRIX = {"DQ_AQ": (2.2, 1.9), "DQ_CQ": (3.1, 3.5), "DQ_DA": (4.2, 4.3),
          "VQ_AQ": (2.0, 2.1), "VQ_CQ": (1.3, 1.2), "VQ_DA": (2.0, 1.8)}


def completion(payoff=PAYOFF, analyze="Frontier: DQ_DA alone. Chosen: DQ_DA.", response="Four.",
               sep="", tail=""):
    return (f"<thinking>Clear question, answer directly.</thinking>{sep}<payoff>{payoff}</payoff>{sep}"
            f"<analyze>{analyze}</analyze>{sep}<response>{response}</response>{tail}")


def cells(**overrides):
    d = {k: {"LLM": 1.0, "user": 2.0} for k in KEYS}
    d.update(overrides)
    return d


# -----------------------------------------------------------------------------
# parse_payoff


def test_parse_strict_json_in_keys_order():
    shuffled = json.dumps({k: {"user": MATRIX[k][1], "LLM": MATRIX[k][0]} for k in reversed(KEYS)})
    m = parse_payoff(shuffled)
    assert list(m) == list(KEYS)
    assert m == MATRIX
    assert all(isinstance(x, float) for cell in m.values() for x in cell)
    assert parse_payoff(" \n" + PAYOFF + "\n ") == MATRIX


def test_parse_python_literal_fallback_and_curly_quotes():
    single = PAYOFF.replace('"', "'")
    assert parse_payoff(single) == MATRIX
    curly = PAYOFF.replace('"', "\u201c", 1)  # an opening curly quote where JSON needs a straight one
    curly = curly.replace('{"DQ_CQ"', "{\u2018DQ_CQ\u2019")
    with pytest.raises(json.JSONDecodeError):
        json.loads(curly)
    # “DQ_AQ" is not valid Python either until the quotes are normalised; after that it parses
    assert parse_payoff(curly.replace('"DQ_AQ"', "\u201cDQ_AQ\u201d")) == MATRIX
    ints = json.dumps({k: {"LLM": 1, "user": -2} for k in KEYS})
    assert parse_payoff(ints)["VQ_DA"] == (1.0, -2.0)
    trailing_comma = PAYOFF[:-1] + ",}"  # not JSON, but a Python literal
    assert parse_payoff(trailing_comma) == MATRIX


def test_parse_never_evaluates(tmp_path):
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(PayoffError):
        parse_payoff(code)
    with pytest.raises(PayoffError):
        parse_payoff("{'DQ_AQ': " + code + "}")
    assert not marker.exists()


@pytest.mark.parametrize("text, words", [
    (json.dumps(cells(DQ_CQ={"LLM": True, "user": 1.0})), ['"DQ_CQ"', '"LLM"', "boolean"]),
    (json.dumps(cells(VQ_AQ={"LLM": 1.0, "user": False})), ['"VQ_AQ"', '"user"', "boolean"]),
    (json.dumps(cells(VQ_CQ={"LLM": float("nan"), "user": 1.0})), ['"VQ_CQ"', '"LLM"', "nan"]),
    (json.dumps(cells(DQ_DA={"LLM": 1.0, "user": float("inf")})), ['"DQ_DA"', '"user"', "inf"]),
    (json.dumps(cells(DQ_DA={"LLM": 1.0, "user": float("-inf")})), ['"DQ_DA"', '"user"', "inf"]),
    (json.dumps(cells()).replace("2.0", "1e999", 1), ['"DQ_AQ"', '"user"', "inf"]),
    (json.dumps(cells()).replace("2.0", "1" + "0" * 400, 1), ['"DQ_AQ"', '"user"', "too large"]),
    (json.dumps(cells(VQ_DA={"LLM": "2.0", "user": 1.0})), ['"VQ_DA"', '"LLM"', "str"]),
    (json.dumps(cells(VQ_DA={"LLM": [1.0], "user": 1.0})), ['"VQ_DA"', '"LLM"', "list"]),
    (json.dumps(cells(VQ_DA={"LLM": None, "user": 1.0})), ['"VQ_DA"', '"LLM"', "NoneType"]),
    (json.dumps(cells(DQ_AQ={"LLM": {"x": 1}, "user": 1.0})), ['"DQ_AQ"', '"LLM"', "dict"]),
    (json.dumps(cells(DQ_AQ=[1.0, 2.0])), ['"DQ_AQ"', "list"]),
    (json.dumps(cells(DQ_AQ=3.0)), ['"DQ_AQ"', "float"]),
    (json.dumps(cells(DQ_CQ={"LLM": 1.0})), ['"DQ_CQ"', "exactly", "'LLM'"]),
    (json.dumps(cells(DQ_CQ={"LLM": 1.0, "user": 2.0, "extra": 0})), ['"DQ_CQ"', "'extra'"]),
    (json.dumps(cells(DQ_CQ={"llm": 1.0, "user": 2.0})), ['"DQ_CQ"', "'llm'"]),
    (json.dumps({k: v for k, v in cells().items() if k != "VQ_CQ"}), ["missing", "VQ_CQ"]),
    (json.dumps({**cells(), "XX_YY": {"LLM": 1, "user": 1}}), ["unexpected", "XX_YY"]),
    (json.dumps({k.lower(): v for k, v in cells().items()}), ["missing", "DQ_AQ", "unexpected", "dq_aq"]),
    ("{1: 2, " + json.dumps(cells())[1:], ["unexpected", "1"]),
    ("[1, 2, 3]", ["list"]),
    ('"DQ_AQ"', ["str"]),
    ("", ["empty"]),
    ("DQ_AQ: LLM 1, user 2", ["neither JSON nor a Python literal"]),
    ("{'a': {[1]: 2}}", ["neither JSON nor a Python literal"]),  # unhashable key: TypeError inside literal_eval
    ("[" * 50_000, ["neither JSON nor a Python literal"]),       # nesting: RecursionError / parser limit
    ("{" + " " * (MAX_PAYOFF_CHARS + 1) + "}", ["characters"]),
])
def test_parse_rejects_with_a_message_naming_the_problem(text, words):
    with pytest.raises(PayoffError) as e:
        parse_payoff(text)
    for w in words:
        assert w in str(e.value), (w, str(e.value))



# A model that writes a cell (or a field) twice has written an ambiguous matrix: which value is meant?
_DUP_KEY = PAYOFF[:-1] + ', "DQ_DA": {"LLM": 0.0, "user": 0.0}}'
_DUP_FIELD = PAYOFF.replace('"DQ_CQ": {"LLM": 3.1,', '"DQ_CQ": {"LLM": 3.1, "LLM": -9,')
_DUP_SAME = PAYOFF[:-1] + ', "VQ_AQ": {"LLM": 2.0, "user": 2.1}}'   # the same value twice is still refused


@pytest.mark.parametrize("text, words", [
    (_DUP_KEY, ['key "DQ_DA" twice']),
    (_DUP_FIELD, ['payoff["DQ_CQ"]', 'field "LLM" twice']),
    (_DUP_SAME, ['key "VQ_AQ" twice']),
    (PAYOFF.replace('"user": 1.2}', '"user": 1.2, "user": 1.2}'), ['payoff["VQ_CQ"]', 'field "user" twice']),
    (_DUP_KEY.replace('"', "'"), ['key "DQ_DA" twice']),                      # Python-literal path
    (_DUP_FIELD.replace('"', "'"), ['payoff["DQ_CQ"]', 'field "LLM" twice']),
    (_DUP_KEY[:-1] + ",}", ['key "DQ_DA" twice']),                             # literal (trailing comma)
    (_DUP_FIELD.replace('"DQ_CQ"', "\u201cDQ_CQ\u201d"), ['payoff["DQ_CQ"]', 'field "LLM" twice']),  # curly quotes
], ids=["json-key", "json-field", "json-same-value", "json-user-field", "literal-key", "literal-field",
        "literal-trailing-comma", "curly-quotes-field"])
def test_parse_refuses_a_key_or_field_written_twice(text, words):
    with pytest.raises(PayoffError) as e:
        parse_payoff(text)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not format_ok(completion(payoff=text))

def test_parse_rejects_non_text():
    with pytest.raises(PayoffError, match="text"):
        parse_payoff(None)


def _parses_or_payoff_error(text):
    try:
        m = parse_payoff(text)
    except PayoffError:
        return
    assert list(m) == list(KEYS)
    assert all(type(x) is float and math.isfinite(x) for cell in m.values() for x in cell)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parse_random_text_only_payoff_error(text):
    _parses_or_payoff_error(text)


_JUNK = ['"', "'", "{", "}", "[", "]", ":", ",", "-", ".", "e", "9", "0", "NaN", "Infinity", "True",
         "None", "1e999", "\u201c", "\u2019", "(", ")", "\\", "\n", "LLM", "user", "DQ_AQ", "#", "lambda"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace"]),
                          st.integers(0, len(PAYOFF)), st.sampled_from(_JUNK)), min_size=1, max_size=6))
def test_parse_mutated_payoff_only_payoff_error(edits):
    text = PAYOFF
    for op, pos, junk in edits:
        pos = min(pos, len(text))
        if op == "insert":
            text = text[:pos] + junk + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + junk + text[pos + len(junk):]
    _parses_or_payoff_error(text)
    _parses_or_payoff_error(text.replace('"', "'"))


def test_format_payoff_round_trip_and_shape():
    text = format_payoff(MATRIX)
    assert parse_payoff(text) == MATRIX
    assert text.startswith('{"DQ_AQ": {"LLM": 2.2, "user": 1.9}, "DQ_CQ": {"LLM": 3.1, "user": 3.5}')
    assert json.loads(text) == json.loads(PAYOFF)
    with pytest.raises(PayoffError, match="VQ_DA"):
        format_payoff({k: v for k, v in MATRIX.items() if k != "VQ_DA"})
    with pytest.raises(PayoffError, match="DQ_AQ"):
        format_payoff({**MATRIX, "DQ_AQ": (float("nan"), 1.0)})


# -----------------------------------------------------------------------------
# blocks and the format check


def test_split_blocks_contents_and_response_start():
    c = completion(analyze=" pick DQ_DA ", response=" Four. ", sep="\n")
    b = split_blocks(c)
    assert b.thinking == "Clear question, answer directly."
    assert b.payoff == PAYOFF
    assert b.analyze == " pick DQ_DA "
    assert b.response == " Four. "
    assert c[b.response_start:].startswith("<response>")
    assert c[:b.response_start].endswith("</analyze>\n")


def test_split_blocks_missing_and_unclosed():
    b = split_blocks("<thinking>x</thinking><response>never closed")
    assert (b.thinking, b.payoff, b.analyze, b.response, b.response_start) == ("x", None, None, None, None)
    b = split_blocks("junk <payoff>{}</payoff> more <response>hi</response> tail")
    assert (b.thinking, b.payoff, b.analyze, b.response) == (None, "{}", None, "hi")
    # blocks are searched in order: a <payoff> mentioned inside <thinking> is not the payoff block
    b = split_blocks("<thinking>write <payoff>X</payoff> next</thinking><payoff>P</payoff>")
    assert b.thinking == "write <payoff>X</payoff> next" and b.payoff == "P"


def test_format_ok_accepts_exact_layout_and_whitespace():
    assert format_ok(completion())
    assert format_ok(completion(sep="\n\n  \t"))
    assert format_ok(completion(tail="\n \n"))
    assert format_ok(completion(response="line one\n\nline <b>two</b>"))


@pytest.mark.parametrize("bad", [
    completion(tail="\nThanks!"),                         # trailing text after </response> (upstream allowed it after \n)
    completion(tail="</response>"),
    " " + completion(),                                    # docs/format.md: nothing before <thinking>
    "Sure! " + completion(),
    completion(sep=" and "),                               # text between blocks
    completion().replace("</analyze>", ""),                # unclosed block
    completion().replace("<analyze>", "<analysis>").replace("</analyze>", "</analysis>"),
    completion(payoff=PAYOFF.replace("4.3", "NaN")),       # payoff does not parse
    completion(payoff=PAYOFF.replace('"VQ_DA"', '"VQ_XX"')),
    "<payoff>" + PAYOFF + "</payoff><thinking>x</thinking><analyze>a</analyze><response>r</response>",
    "",
])
def test_format_ok_rejects(bad):
    assert not format_ok(bad)


def _tag_junk(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    pieces = ["<thinking>", "</thinking>", "<payoff>", "</payoff>", "<analyze>", "</analyze>",
              "<response>", "</response>", "{", "}", '"DQ_AQ": ', '{"LLM": 1.0, "user": ', " ", "\n",
              "choose ", "DQ_DA", "CQ", "<", ">", "x" * 7]
    out, size = [], 0
    while size < n_chars:
        p = rng.choice(pieces)
        out.append(p)
        size += len(p)
    return "".join(out)


@pytest.mark.parametrize("junk", [
    _tag_junk(1_000_000),
    "<thinking>" + " " * 1_000_000,
    "<thinking></thinking>" + " " * 1_000_000 + "<payoff>",
    "<thinking>a</thinking><payoff>" + "[" * 1_000_000 + "</payoff><analyze>DQ_DA</analyze><response>r</response>",
    completion(analyze="choose DQ_DA " * 80_000),
    "<thinking>" * 100_000,
], ids=["tag-soup", "open-then-spaces", "spaces-between", "huge-payoff", "huge-analyze", "repeated-open"])
def test_game_functions_are_fast_on_megabyte_junk(junk):
    # A guard against quadratic (or backtracking) parsing, not a benchmark: linear work on a megabyte takes
    # well under a second even on a loaded 2-core machine, a quadratic pass takes minutes.
    t0 = time.perf_counter()
    format_ok(junk)
    split_blocks(junk)
    pareto_consistency(junk)
    analyze_choice(junk)
    assert time.perf_counter() - t0 < 5.0


# -----------------------------------------------------------------------------
# Pareto frontier, welfare, choice


def test_pareto_frontier_ties_and_negatives():
    m = {"DQ_AQ": (2.0, 2.0), "DQ_CQ": (2.0, 2.0),   # identical: neither dominates the other
         "DQ_DA": (3.0, 1.0), "VQ_AQ": (1.0, 3.0),   # trade-offs: on the frontier
         "VQ_CQ": (-1.0, -1.0),                      # dominated by everything
         "VQ_DA": (2.0, 1.0)}                        # equal LLM, lower user than DQ_AQ: weakly dominated
    assert pareto_frontier(m) == ["DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_AQ"]
    neg = {"DQ_AQ": (-3.0, -3.0), "DQ_CQ": (-1.0, -4.0), "DQ_DA": (-4.0, -1.0),
           "VQ_AQ": (-3.0, -3.5), "VQ_CQ": (-5.0, -5.0), "VQ_DA": (-1.0, -4.0)}
    # VQ_AQ loses to DQ_AQ on user only; VQ_CQ loses to all; DQ_CQ/VQ_DA tie
    assert pareto_frontier(neg) == ["DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_DA"]


def test_pareto_frontier_eps():
    m = {**{k: (0.0, 0.0) for k in KEYS}, "DQ_AQ": (0.1 + 0.2, 1.0), "DQ_DA": (0.3, 1.0)}
    assert 0.1 + 0.2 != 0.3
    assert pareto_frontier(m) == ["DQ_AQ", "DQ_DA"]        # within eps: a tie, both stay
    assert pareto_frontier(m, eps=0.0) == ["DQ_AQ"]          # 0.30000000000000004 > 0.3 dominates


def test_welfare_functions():
    assert welfare_sum(1.5, -0.5) == 1.0
    assert cobb_douglas(4.0, 9.0) == 6.0
    assert cobb_douglas(0.0, 5.0) == 0.0
    for l, u in [(-3.0, -3.0), (-1.0, 4.0), (4.0, -0.1), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="non-negative"):
            cobb_douglas(l, u)


def test_choose_action_sum_rule_and_tie_breaks():
    assert choose_action(MATRIX) == "DQ_DA"  # 4.2 + 4.3 = 8.5 is the largest sum
    # sums tie at 4.0: the larger user payoff wins
    m = {**{k: (0.0, 0.0) for k in KEYS}, "DQ_AQ": (3.0, 1.0), "VQ_DA": (1.0, 3.0)}
    assert choose_action(m) == "VQ_DA"
    # sum and user tie, so LLM ties too: the first key in KEYS order wins
    m = {**{k: (0.0, 0.0) for k in KEYS}, "DQ_CQ": (2.0, 2.0), "VQ_AQ": (2.0, 2.0)}
    assert choose_action(m) == "DQ_CQ"
    # float noise below eps is a tie, not a win: (0.1+0.2, 1) vs (0.3, 1) -> KEYS order
    m = {**{k: (0.0, 0.0) for k in KEYS}, "DQ_DA": (0.3, 1.0), "VQ_DA": (0.1 + 0.2, 1.0)}
    assert choose_action(m) == "DQ_DA"
    with pytest.raises(ValueError, match="unknown choice rule 'nash'"):
        choose_action(MATRIX, rule="nash")
    with pytest.raises(ValueError, match="non-empty"):
        choose_action({})


def test_choose_action_cobb_douglas_is_sign_safe():
    # upstream's raw product gave (-3)(-3) = 9 > 2*2 = 4 and chose the mutual loss
    m = {k: (-3.0, -3.0) for k in KEYS} | {"DQ_DA": (2.0, 2.0)}
    assert choose_action(m, "cobb_douglas") == "DQ_DA"
    m = {k: (2.0, 2.0) for k in KEYS} | {"VQ_CQ": (-3.0, -3.0)}
    assert choose_action(m, "cobb_douglas") == "DQ_AQ"  # five (2,2) ties: KEYS order



def test_choose_action_product_is_upstreams_raw_product():
    # upstream's rule: the largest raw l*u over all six cells, so the mutual loss (-3,-3) -> 9 beats
    # (2,2) -> 4 -- exactly what the sign-safe rule refuses
    m = {k: (-3.0, -3.0) for k in KEYS} | {"DQ_DA": (2.0, 2.0)}
    assert choose_action(m, "cobb_douglas") == "DQ_DA"
    # five cells tie at 9; their strategies in matrix order: AQ (DQ_AQ), CQ (DQ_CQ), DA (VQ_DA).
    # One strategy is drawn, then its first tied cell: never DQ_DA, and each strategy for some seed.
    first_cell = {"AQ": "DQ_AQ", "CQ": "DQ_CQ", "DA": "VQ_DA"}
    picks = set()
    for seed in range(30):
        got = choose_action(m, "product", rng=random.Random(seed))
        assert got == first_cell[random.Random(seed).choice(["AQ", "CQ", "DA"])]
        picks.add(got)
    assert picks == {"DQ_AQ", "DQ_CQ", "VQ_DA"}
    # no rng: random.Random(0), so the call is deterministic
    assert choose_action(m, "product") == choose_action(m, "product", rng=random.Random(0))
    # a unique largest product needs no draw, but one is made (upstream always called random.choice),
    # so a seeded rng advances by the same amount whatever the matrix
    r, ref = random.Random(7), random.Random(7)
    assert choose_action(MATRIX, "product", rng=r) == "DQ_DA"   # 4.2 * 4.3 = 18.06
    ref.choice(["DA"])
    assert r.random() == ref.random()


def test_choose_action_product_draws_a_strategy_not_a_cell():
    # DQ_DA, VQ_DA and DQ_AQ tie at 4: the draw is between DA and AQ (one each), so DA is not
    # twice as likely for having two cells; DA's first cell, DQ_DA, stands for it
    m = {k: (0.0, 0.0) for k in KEYS} | {"DQ_DA": (2.0, 2.0), "VQ_DA": (1.0, 4.0), "DQ_AQ": (4.0, 1.0)}
    got = [choose_action(m, "product", rng=random.Random(s)) for s in range(400)]
    assert set(got) == {"DQ_AQ", "DQ_DA"}
    assert 0.4 < got.count("DQ_DA") / len(got) < 0.6
    # products are compared exactly, as upstream did: 0.1 * 3 = 0.30000000000000004 beats 0.3 * 1
    m = {k: (0.0, 0.0) for k in KEYS} | {"DQ_CQ": (0.3, 1.0), "VQ_CQ": (0.1, 3.0)}
    assert all(choose_action(m, "product", rng=random.Random(s)) == "VQ_CQ" for s in range(10))


def test_choose_action_huge_payoffs_do_not_overflow():
    # products of payoffs near 1e200 overflow to inf: every cell would tie at inf and the first
    # key would win whatever the numbers; the choice must be the one on the matrix scaled down
    small = {"DQ_AQ": (1.0, 1.0), "DQ_CQ": (3.0, 1.0), "DQ_DA": (2.5, 2.5),
             "VQ_AQ": (0.5, 0.5), "VQ_CQ": (1.0, 3.0), "VQ_DA": (-1.0, -1.0)}
    for scale in (1e200, 1e307):
        huge = {k: (l * scale, u * scale) for k, (l, u) in small.items()}
        assert choose_action(huge, "cobb_douglas") == choose_action(small, "cobb_douglas") == "DQ_DA"
        assert choose_action(huge, "sum") == choose_action(small, "sum") == "DQ_DA"
    spread = {**small, "DQ_DA": (1.5e308, 1.5e308), "VQ_DA": (-1.5e308, -1.5e308)}   # l - shift overflows
    assert choose_action(spread, "cobb_douglas") == "DQ_DA" and choose_action(spread, "sum") == "DQ_DA"
    # small payoffs next to huge ones still count: every LLM payoff 1e308, the user's decides
    flat = {k: (1e308, u) for k, (_, u) in small.items()}
    assert pareto_frontier(flat) == ["VQ_CQ"]
    assert choose_action(flat, "cobb_douglas") == choose_action(flat, "sum") == "VQ_CQ"
    assert cobb_douglas(1e300, 1e300) == pytest.approx(1e300) and cobb_douglas(0.25, 4.0) == 1.0

def test_choose_action_cobb_douglas_hand_numbers():
    # no negatives: no shift. DQ_AQ sqrt(3*0.1)=0.548 < DQ_DA sqrt(1*0.5)=0.707 (sum rule: 3.1 > 1.5)
    m = {k: (0.0, 0.0) for k in KEYS} | {"DQ_AQ": (3.0, 0.1), "DQ_DA": (1.0, 0.5)}
    assert choose_action(m, "cobb_douglas") == "DQ_DA"
    assert choose_action(m, "sum") == "DQ_AQ"
    # minimum -1: shift by +1. DQ_AQ sqrt(4*1.1)=2.098 > DQ_DA sqrt(2*1.5)=1.732
    m = {k: (-1.0, -1.0) for k in KEYS} | {"DQ_AQ": (3.0, 0.1), "DQ_DA": (1.0, 0.5)}
    assert choose_action(m, "cobb_douglas") == "DQ_AQ"
    # balanced beats lopsided: (4, 0.5) sum 4.5 vs (2, 2) sum 4; min 0 -> sqrt(2)=1.414 < 2
    m = {k: (0.0, 0.0) for k in KEYS} | {"VQ_AQ": (4.0, 0.5), "VQ_CQ": (2.0, 2.0)}
    assert choose_action(m, "sum") == "VQ_AQ"
    assert choose_action(m, "cobb_douglas") == "VQ_CQ"


# -----------------------------------------------------------------------------
# the analyze choice and Pareto consistency


@pytest.mark.parametrize("text, expected", [
    ("Frontier: DQ_DA (4.2, 4.3). Chosen: DQ_DA.", "DQ_DA"),
    ("I pick VQ_CQ because it beats DQ_AQ and DQ_DA.", "VQ_CQ"),       # explicit beats last-mentioned
    ("DQ_DA has the top sum; DQ_AQ trails. So I choose DQ_DA over DQ_AQ.", "DQ_DA"),
    ("Non-dominated: DQ_AQ, DQ_DA", "DQ_DA"),                          # no choice word: last key
    ("Selected strategy -> DQ-DA", "DQ_DA"),                           # other separators
    ("Recommend: VQ AQ", "VQ_AQ"),
    ("A direct answer (DA) is best here.", "DA"),                      # only a strategy
    ("I choose CQ over DA.", "CQ"),
    ("DQ_DAX and xVQ_CQ are not keys", None),
    ("no names at all", None),
    ("", None),
    (None, None),
])
def test_analyze_choice(text, expected):
    assert analyze_choice(text) == expected


def test_choice_on_frontier_key_and_strategy():
    # frontier of MATRIX is DQ_DA alone: (4.2, 4.3) beats every other cell on both coordinates
    assert pareto_frontier(MATRIX) == ["DQ_DA"]
    assert choice_on_frontier(MATRIX, "DQ_DA")
    assert not choice_on_frontier(MATRIX, "DQ_CQ")
    assert choice_on_frontier(MATRIX, "DA")
    assert not choice_on_frontier(MATRIX, "CQ")
    assert not choice_on_frontier(MATRIX, None)


def test_pareto_consistency():
    assert pareto_consistency(completion()) == 1.0
    assert pareto_consistency(completion(analyze="Chosen: DQ_CQ")) == 0.0   # dominated by DQ_DA
    assert pareto_consistency(completion(analyze="Answer directly: DA")) == 1.0
    assert pareto_consistency(completion(analyze="Ask first: CQ")) == 0.0
    assert pareto_consistency(completion(analyze="no choice named")) == 0.0
    assert pareto_consistency(completion(payoff="{broken")) == 0.0
    assert pareto_consistency("<thinking>x</thinking><payoff>" + PAYOFF + "</payoff>") == 0.0
    # trailing junk fails the format check but not consistency: they are separate terms
    assert pareto_consistency(completion(tail=" extra")) == 1.0
