"""nano_gtalign/metrics.py and nano_gtalign/paper_metrics.py against hand-computed numbers."""
import math
import random
from types import SimpleNamespace

import pytest

from nano_gtalign import metrics, paper_metrics
from nano_gtalign.game import KEYS

PAY = ('{"DQ_AQ": {"LLM": 2, "user": 2}, "DQ_CQ": {"LLM": 1, "user": 1}, "DQ_DA": {"LLM": 3, "user": 3}, '
       '"VQ_AQ": {"LLM": 1, "user": 1}, "VQ_CQ": {"LLM": 1, "user": 1}, "VQ_DA": {"LLM": 1, "user": 1}}')
RECORD = {"data_source": "math-hard", "prompt": [{"role": "user", "content": "What is 37 + 48?"}]}


def bd(**kw):
    base = dict(format=1.0, payoff_spread=0.75, user=0.64, llm=0.25, welfare=0.4, answer_user=1.0, answer_llm=1.0,
                pareto_consistency=1.0, action="DQ_DA", question_type="DQ", strategy="DA",
                judge_failed=False, data_source="math-hard")
    base.update(kw)
    return SimpleNamespace(**base)


def test_sample_row_lengths_welfares_and_action():
    completion = ("<thinking>be brief</thinking><payoff>" + PAY + "</payoff>"
                  "<analyze>Choose DQ_DA.</analyze><response>It is 85.</response>")
    row = metrics.sample_row(bd(), completion, RECORD, count_tokens=len, generated_tokens=41)
    # <thinking>be brief</thinking> 29 + <payoff> 8 + </payoff> 9 + <analyze> 9 + text 13 + </analyze> 10
    assert row["reasoning_chars"] == 78 + len(PAY)
    assert row["reasoning_tokens"] == 78 + len(PAY)  # count_tokens=len counts characters
    assert row["response_words"] == 3 and row["response_tokens"] == 9
    assert row["total_tokens"] == 78 + len(PAY) + len("<response>It is 85.</response>")
    assert row["generated_tokens"] == 41  # the sampler's count is kept beside the re-encoded one
    assert row["parse_ok"] is True and row["action"] == "DQ_DA"
    assert row["payoff_spread"] == 0.75 and row["paper_response_chars"] == 9   # "It is 85."
    assert row["w_cd"] == pytest.approx(0.4)        # sqrt(0.64 * 0.25)
    assert row["w_linear"] == pytest.approx(0.445)  # (0.64 + 0.25) / 2
    assert row["prompt_id"] == metrics.prompt_key(dict(RECORD)) != metrics.prompt_key({**RECORD, "data_source": "minerva"})


def test_sample_row_broken_completion():
    completion = "<thinking>x</thinking><payoff>{oops</payoff> no response here"
    row = metrics.sample_row(bd(user=0.0, llm=0.0, welfare=0.0, action=None, question_type=None, strategy=None),
                             completion, RECORD)
    assert row["parse_ok"] is False and row["action"] is None
    assert row["reasoning_chars"] == len(completion) and row["response_words"] == 0  # no <response>: all reasoning
    assert row["reasoning_tokens"] is None and row["w_cd"] == 0.0
    assert row["paper_response_chars"] is None   # no <response> block: the paper's table drops it
    # an <analyze> that named only the strategy: the key comes from question type + strategy
    assert metrics.sample_row(bd(action="DA", question_type="VQ", strategy="DA"), completion, RECORD)["action"] == "VQ_DA"


def test_sample_row_after_failed_judge():
    nan = float("nan")
    b = bd(judge_failed=True, answer_user=nan, answer_llm=nan, user=nan, llm=nan, welfare=nan)
    r = metrics.sample_row(b, "<payoff>{}</payoff><response>hi</response>", RECORD)
    assert r["judge_failed"] is True and r["parse_ok"] is False
    assert [r[k] for k in ("answer_user", "answer_llm", "user", "llm", "welfare", "w_cd", "w_linear")] == [None] * 7
    d = metrics.breakdown_dict(b)
    assert d["user"] is None and d["format"] == 1.0


def row(src, fmt, parse, failed, a, u, l, action, pc, rc, rw, rt, st, tt, pid="p"):
    r = {"prompt_id": pid, "data_source": src, "format": fmt, "parse_ok": parse, "judge_failed": failed,
         "answer_llm": a, "answer_user": a, "user": u, "llm": l, "w_cd": math.sqrt(u * l), "w_linear": (u + l) / 2,
         "welfare": math.sqrt(u * l), "pareto_consistency": pc, "action": action,
         "reasoning_chars": rc, "response_words": rw, "reasoning_tokens": rt, "response_tokens": st, "total_tokens": tt}
    if failed:  # a failed judgement left out (the default): its answer terms, U, L and W are unknown
        r.update(dict.fromkeys(("answer_llm", "answer_user", "user", "llm", "w_cd", "w_linear", "welfare")))
    return r


ROWS = [
    row("math-hard", 1.0, True, False, 1.0, 0.8, 0.5, "DQ_DA", 1.0, 100, 10, 30, 12, 42),
    row("math-hard", 0.0, True, False, 0.0, 0.2, 0.2, "DQ_CQ", 0.0, 200, 20, 50, 25, 75),
    row("medium", 0.0, False, False, 0.0, 0.0, 0.0, None, 0.0, 50, 0, 20, 0, 20),
    row("medium", 1.0, True, True, 0.0, 0.3, 0.3, "VQ_AQ", 1.0, 80, 40, 25, 40, 65),
]


def test_metrics_by_source_overall_by_hand():
    m = metrics.metrics_by_source(ROWS)
    assert list(m) == ["math-hard", "medium", "overall"]
    o = m["overall"]
    assert (o["n"], o["n_scored"]) == (4, 3)
    assert (o["format_rate"], o["parse_rate"], o["judge_failure_rate"]) == (0.5, 0.75, 0.25)
    # U, L, W, answer: the judge-failed row 4 is left out -> rows 1-3
    assert o["answer_llm"] == pytest.approx(1 / 3)
    assert o["user"] == pytest.approx((0.8 + 0.2 + 0.0) / 3)
    assert o["llm"] == pytest.approx((0.5 + 0.2 + 0.0) / 3)
    assert o["w_cd"] == pytest.approx((math.sqrt(0.4) + 0.2) / 3)
    assert o["w_linear"] == pytest.approx((0.65 + 0.2) / 3)
    assert o["pareto_consistency"] == pytest.approx(2 / 3)  # over the 3 parsed rows
    # --judge-failure zero: the failed row was scored as a verdict of 0, so it is averaged in (and still counted)
    zero = metrics.group_metrics(ROWS[:3] + [{**ROWS[3], "answer_llm": 0.0, "answer_user": 0.0, "user": 0.3,
                                              "llm": 0.3, "w_cd": 0.3, "w_linear": 0.3, "welfare": 0.3}])
    assert zero["n_scored"] == 4 and zero["judge_failure_rate"] == 0.25 and zero["user"] == pytest.approx(1.3 / 4)
    assert (o["reasoning_chars"], o["response_words"]) == (107.5, 17.5)
    assert (o["reasoning_tokens"], o["response_tokens"], o["total_tokens"]) == (31.25, 19.25, 50.5)
    assert o["generated_tokens"] is None  # the rows do not carry it
    assert metrics.group_metrics([{**r, "generated_tokens": 10 * i} for i, r in enumerate(ROWS)])["generated_tokens"] == 15
    assert o["response_ratio"] == pytest.approx(77 / 202)
    assert o["answer_per_1k_tokens"] == pytest.approx(1000 * 1.0 / (42 + 75 + 20))
    assert o["actions"] == {"DQ_AQ": 0.0, "DQ_CQ": 0.25, "DQ_DA": 0.25, "VQ_AQ": 0.25, "VQ_CQ": 0.0,
                            "VQ_DA": 0.0, "none": 0.25}


def test_metrics_by_source_per_source_and_undefined_values():
    med = metrics.metrics_by_source(ROWS)["medium"]
    assert (med["n"], med["n_scored"], med["judge_failure_rate"]) == (2, 1, 0.5)
    assert (med["answer_llm"], med["user"], med["pareto_consistency"]) == (0.0, 0.0, 1.0)
    assert med["response_ratio"] == pytest.approx(40 / 85) and med["answer_per_1k_tokens"] == 0.0
    only_failed = metrics.group_metrics([ROWS[3]])
    assert only_failed["answer_llm"] is None and only_failed["user"] is None  # unknown, not zero
    assert only_failed["answer_per_1k_tokens"] is None
    no_tokens = metrics.group_metrics([{**r, "reasoning_tokens": None, "response_tokens": None, "total_tokens": None}
                                       for r in ROWS])
    assert no_tokens["response_tokens"] is None and no_tokens["response_ratio"] is None
    table = metrics.format_table(metrics.metrics_by_source([{**ROWS[0], "total_tokens": None}]))
    lines = table.splitlines()
    assert lines[0].split() == ["scores", "n", "format", "parse", "answer", "ans_user", "U", "L", "W_cd", "W_linear",
                                "pareto", "judge_fail"]
    assert lines[1].split() == ["math-hard", "1", "1.000", "1.000", "1.000", "1.000", "0.800", "0.500",
                                f"{math.sqrt(0.4):.3f}", "0.650", "1.000", "0.000"]
    assert lines[5].split() == ["math-hard", "100.0", "-", "10.0", "-", "-", "-", "-", "-"]  # no token counts
    assert lines[-1].split() == ["overall", "0.000", "0.000", "1.000", "0.000", "0.000", "0.000", "0.000"]


def test_hypervolume_hand_values():
    # The dominated region of (1,0), (.5,.5), (0,1) above (0,0) is the union of the boxes
    # [0,1]x[0,0], [0,.5]x[0,.5], [0,0]x[0,1]: only the middle one has area, 0.25. (0.5 would be
    # the area under the straight line through the three points, which no point dominates:
    # e.g. (0.7, 0.1) is beaten by none of them.)
    assert metrics.hypervolume([(1, 0), (0.5, 0.5), (0, 1)], (0, 0)) == pytest.approx(0.25)
    assert metrics.hypervolume([(3, 1), (1, 3)], (0, 0)) == pytest.approx(3 + 3 - 1)
    # dominated points and points not above the reference change nothing
    assert metrics.hypervolume([(3, 1), (1, 3), (1, 1), (-1, 5), (2, 0)], (0, 0)) == pytest.approx(5)
    assert metrics.hypervolume([(3, 1), (1, 3)], (0.5, 0.5)) == pytest.approx(1.25 + 1.25 - 0.25)
    assert metrics.hypervolume([(2, 3)], (0, 0)) == 6
    assert metrics.hypervolume([], (0, 0)) == 0.0


def _grid_hypervolume(points, ref):
    """Independent reference: exact area on the grid of all coordinates, cell by cell."""
    xs = sorted({ref[0]} | {p[0] for p in points if p[0] > ref[0]})
    ys = sorted({ref[1]} | {p[1] for p in points if p[1] > ref[1]})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(p[0] >= x1 and p[1] >= y1 for p in points):
                area += (x1 - x0) * (y1 - y0)
    return area


def test_hypervolume_matches_grid_reference():
    rng = random.Random(0)
    for _ in range(30):
        pts = [(round(rng.uniform(0, 1), 2), round(rng.uniform(0, 1), 2)) for _ in range(rng.randint(1, 9))]
        ref = (rng.uniform(-0.2, 0.4), rng.uniform(-0.2, 0.4))
        assert metrics.hypervolume(pts, ref) == pytest.approx(_grid_hypervolume(pts, ref))


def test_frontier_coverage_regret_small_sets():
    assert metrics.frontier([(1, 0), (0.5, 0.5), (0, 1), (0.4, 0.4), (0.5, 0.5)]) == [(0, 1), (0.5, 0.5), (1, 0)]
    assert metrics.eps_coverage([(0.95, 0.5)], [(1.0, 0.5), (0.0, 1.0)], eps=0.1) == 0.5
    assert metrics.eps_coverage([(0.95, 0.5)], [(1.0, 0.5)], eps=0.01) == 0.0
    # all U equal: only the L coordinate can be regretted, range of L = 0.4
    ra, rb = metrics.linf_regret([(0.5, 0.2), (0.5, 0.6)], [(0.5, 0.4), (0.5, 0.6)])
    assert (ra, rb) == (pytest.approx((0.2 / 0.4 + 0) / 2), 0.0)
    with pytest.raises(ValueError, match="matched"):
        metrics.linf_regret([(0, 0)], [])


def cmp_row(pid, u, l, failed=False):
    return {"prompt_id": pid, "user": u, "llm": l, "judge_failed": failed}


def test_compare_by_hand():
    a = [cmp_row("p1", 0.5, 0.5), cmp_row("p2", 0.2, 0.8), cmp_row("p3", 0.6, 0.1),
         cmp_row("p4", 0.2, 0.4), cmp_row("p4", 0.4, 0.2),         # two samples: mean (0.3, 0.3)
         cmp_row("p5", 0.9, 0.9, failed=True), cmp_row("p6", 0.1, 0.1)]
    b = [cmp_row("p1", 0.6, 0.5), cmp_row("p2", 0.2, 0.8), cmp_row("p3", 0.5, 0.2), cmp_row("p4", 0.2, 0.2),
         cmp_row("p5", 0.1, 0.1)]
    c = metrics.compare(a, b, eps=0.01)
    assert (c["n_matched"], c["only_a"], c["only_b"]) == (4, 1, 1)  # p5 has no scored sample in a
    assert c["dominance"] == {"b_dominates_a": 1, "a_dominates_b": 1, "equal": 1, "incomparable": 1}
    # joint frontier of the 8 points: (0.2, 0.8) and (0.6, 0.5); a reaches only the first
    assert c["frontier_size"] == 2 and (c["coverage_a"], c["coverage_b"]) == (0.5, 1.0)
    assert metrics.compare(a, b, eps=0.15)["coverage_a"] == 1.0  # (0.5, 0.5) is within 0.15 of (0.6, 0.5)
    assert c["ref"] == (0.2, 0.1)
    assert c["hypervolume_a"] == pytest.approx(0.3 * 0.4)   # only (0.5, 0.5)'s box has area
    assert c["hypervolume_b"] == pytest.approx(0.4 * 0.4)   # only (0.6, 0.5)'s box has area
    assert c["hypervolume_joint"] == pytest.approx(0.16)
    # ranges over the 8 points: U 0.2..0.6 (0.4), L 0.1..0.8 (0.7)
    assert c["regret_a"] == pytest.approx((0.1 / 0.4 + 0 + 0.1 / 0.7 + 0) / 4)
    assert c["regret_b"] == pytest.approx((0 + 0 + 0.1 / 0.4 + 0.1 / 0.4) / 4)
    text = metrics.format_comparison(c, "base", "new")
    assert "new dominates base on 1" in text and "matched prompts: 4" in text
    empty = metrics.compare(a, [cmp_row("zz", 1, 1)])
    assert empty["n_matched"] == 0 and math.isnan(empty["hypervolume_a"])
    assert "matched prompts: 0" in metrics.format_comparison(empty)


def test_action_columns_cover_every_key():
    assert set(metrics.group_metrics(ROWS)["actions"]) == set(KEYS) | {"none"}


# -----------------------------------------------------------------------------
# the paper's own definitions (upstream experiments/basic_metrics.py and pareto_ratio.py)

@pytest.mark.parametrize("completion, chars", [
    ("<thinking>x</thinking><response>  hi there </response>", 8),   # stripped
    ("<response>a</response><response>bbb</response>", 1),           # the first block
    ("</response><response>xy</response>", 2),                       # the first close after the open
    ("<response>r</response><thinking>t</thinking><payoff>{}</payoff>", 1),  # anywhere, not in block order
    ("<response>never closed", None),
    ("no tags at all", None),
])
def test_paper_response_chars(completion, chars):
    assert metrics.paper_response_chars(completion) == chars


def test_paper_format_score_and_answer():
    assert paper_metrics.paper_format_score(1.0, 0.75) == pytest.approx(0.1 + 0.15 * 0.75)   # 0.2125
    assert paper_metrics.paper_format_score(0.0, 0.5) == pytest.approx(0.075)
    assert paper_metrics.paper_format_score(1.0, 0.75, llm_reward="ablation") == 1.0           # the plain check
    medium = {"data_source": "medium", "judge_failed": False, "answer_user": 0.6, "answer_llm": 0.25}
    assert paper_metrics.paper_answer(medium) == 0.6                                           # max(BLEU, 1/4)
    assert paper_metrics.paper_answer({**medium, "answer_user": 0.1, "answer_llm": 0.75}) == 0.75
    assert paper_metrics.paper_answer({**medium, "data_source": "math-hard"}) == 0.25          # A_llm elsewhere
    assert paper_metrics.paper_answer({**medium, "judge_failed": True, "answer_user": None, "answer_llm": None}) is None
    # a failure scored as a verdict of 0 (upstream's way) has finite terms: max(BLEU, 0)
    assert paper_metrics.paper_answer({**medium, "judge_failed": True, "answer_llm": 0.0}) == 0.6


def paper_row(src, fmt, spread, a_user, a_llm, total, resp, failed=False):
    return {"data_source": src, "format": fmt, "payoff_spread": spread, "judge_failed": failed,
            "answer_user": a_user, "answer_llm": a_llm, "total_chars": total, "paper_response_chars": resp}


PAPER_ROWS = [
    paper_row("math-hard", 1.0, 1.0, 1.0, 1.0, 400, 100),
    paper_row("math-hard", 0.0, 0.5, 0.0, 0.0, 200, 50),
    paper_row("medium", 1.0, 0.75, 0.6, 0.25, 1000, 600),
    paper_row("medium", 1.0, 1.0, None, None, 600, 200, failed=True),
    paper_row("math-hard", 0.0, 0.0, 0.0, 0.0, 300, None),            # no <response>: dropped
]


def test_paper_run_metrics_by_hand():
    m = paper_metrics.paper_metrics_by_source(PAPER_ROWS)
    o = m["overall"]
    assert (o["n"], o["n_kept"], o["n_answered"]) == (5, 4, 3)
    # format over the 4 kept: 0.1 + 0.15, 0 + 0.075, 0.1 + 0.1125, 0.1 + 0.15
    assert o["format"] == pytest.approx((0.25 + 0.075 + 0.2125 + 0.25) / 4)
    assert o["answer"] == pytest.approx((1 + 0 + 0.6) / 3)     # medium: max(0.6, 0.25); the failed judge left out
    assert (o["total_chars"], o["response_chars"]) == (550.0, 237.5)
    assert o["answer_per_1k_chars"] == pytest.approx(1000 * (1.6 / 3) / 550)
    assert o["response_ratio"] == pytest.approx(237.5 / 550)
    math_hard, medium = m["math-hard"], m["medium"]
    assert (math_hard["n"], math_hard["n_kept"], math_hard["format"]) == (3, 2, pytest.approx(0.1625))
    assert (math_hard["answer"], math_hard["total_chars"], math_hard["response_ratio"]) == (0.5, 300.0, 0.25)
    assert math_hard["answer_per_1k_chars"] == pytest.approx(1000 * 0.5 / 300)
    assert (medium["answer"], medium["n_answered"], medium["response_ratio"]) == (0.6, 1, 0.5)
    assert paper_metrics.paper_run_metrics(PAPER_ROWS, llm_reward="ablation")["format"] == 0.75   # (1 + 0 + 1 + 1) / 4
    empty = paper_metrics.paper_run_metrics([PAPER_ROWS[4]])
    assert empty["n_kept"] == 0 and empty["format"] is None and empty["answer_per_1k_chars"] is None
    table = paper_metrics.format_paper_table(m).splitlines()
    assert table[0].startswith("the paper's definitions") and "without <response> dropped" in table[1]
    assert table[2].split() == ["paper", "n", "kept", "format", "answer", "total_ch", "resp_ch", "answer/1k_ch",
                                "resp/total"]
    assert table[-1].split()[:4] == ["overall", "5", "4", "0.197"]


def test_paper_fields_from_an_older_per_sample_line():
    # a line written before rows carried payoff_spread / paper_response_chars: breakdown and completion
    old = {k: v for k, v in PAPER_ROWS[0].items() if k not in ("payoff_spread", "paper_response_chars")}
    old |= {"breakdown": {"payoff_spread": 1.0}, "completion": "<response>" + "x" * 100 + "</response>"}
    assert paper_metrics.paper_run_metrics([old]) == paper_metrics.paper_run_metrics([PAPER_ROWS[0]])
    with pytest.raises(ValueError, match="re-score"):
        paper_metrics.paper_run_metrics([{k: v for k, v in old.items() if k != "completion"}])


def test_paper_frontier_metrics_by_hand():
    # hypervolume as published: the frontier U descending, each width from the previous (larger) U,
    # so only the first rectangle counts
    assert paper_metrics.paper_frontier([(1, 3), (3, 1), (1, 1), (3, 1)]) == [(3, 1), (1, 3)]
    assert paper_metrics.paper_hypervolume([(3, 1), (1, 3)], (0, 0)) == 3.0          # true area 3 + 3 - 1 = 5
    assert metrics.hypervolume([(3, 1), (1, 3)], (0, 0)) == 5.0
    assert paper_metrics.paper_hypervolume([(1, 0), (0.5, 0.5), (0, 1)], (0, 0)) == 0.0   # true area 0.25
    assert paper_metrics.paper_hypervolume([(2, 3)], (0, 0)) == 6.0                   # one point: they agree
    assert paper_metrics.paper_hypervolume([], (0, 0)) == 0.0
    # eps-coverage: share of the run's points within eps (relative to the ranges) of a frontier point
    front, ranges = [(0.7, 0.6), (0.4, 0.9)], (0.4, 0.5)
    run = [(0.69, 0.6), (0.6, 0.6), (0.4, 0.9)]   # 0.01/0.4 = 0.025 <= 0.05; 0.1/0.4 = 0.25; on it
    assert paper_metrics.paper_eps_coverage(run, front, ranges) == pytest.approx(2 / 3)
    assert paper_metrics.paper_eps_coverage(run, front, ranges, eps=0.0) == pytest.approx(1 / 3)
    assert paper_metrics.paper_eps_coverage(run, front, ranges, eps=0.3) == 1.0
    # regret: nearest frontier point in the normalised L-inf shortfall. (0.5, 0.5): against (0.7, 0.6)
    # max(0.2/0.4, 0.1/0.5) = 0.5, against (0.4, 0.9) max(0, 0.4/0.5) = 0.8 -> 0.5; (0.4, 0.9): 0
    assert paper_metrics.paper_linf_regret([(0.5, 0.5), (0.4, 0.9)], front, ranges) == pytest.approx(0.25)
    # a zero range divides by 1
    assert paper_metrics._paper_ranges([(0.5, 0.2), (0.5, 0.6)]) == (1.0, pytest.approx(0.4))


def test_paper_compare_by_hand():
    # docs/metrics.md's worked example: a (0.6, 0.5), (0.3, 0.9), (0.5, 0.7); b (0.7, 0.6), (0.4, 0.6), (0.5, 0.7)
    a = [cmp_row("p1", 0.6, 0.5), cmp_row("p2", 0.3, 0.9), cmp_row("p3", 0.5, 0.7)]
    b = [cmp_row("p1", 0.7, 0.6), cmp_row("p2", 0.4, 0.6), cmp_row("p3", 0.5, 0.7), cmp_row("p4", 1, 1)]
    c = paper_metrics.paper_compare(a, b)
    assert (c["n_matched"], c["frontier_size"], c["eps"]) == (3, 3, 0.05)
    assert c["ranges"] == (pytest.approx(0.4), pytest.approx(0.4)) and c["ref"] == (0.3, 0.5)
    # a: (0.6, 0.5) is 0.25 short of (0.7, 0.6) on both axes -> not covered, regret 0.25; the others on it
    assert c["a"]["eps_coverage"] == c["a"]["on_frontier"] == pytest.approx(2 / 3)
    assert c["a"]["regret"] == pytest.approx(0.25 / 3)
    # b: (0.4, 0.6) is 0.25 short of (0.5, 0.7)
    assert c["b"]["eps_coverage"] == pytest.approx(2 / 3) and c["b"]["regret"] == pytest.approx(0.25 / 3)
    # published hypervolume: a's largest-U frontier point (0.6, 0.5) has height 0 -> 0 (true 0.04);
    # b's (0.7, 0.6): 0.4 x 0.1 = 0.04 (true 0.06)
    assert c["a"]["hypervolume_published"] == 0.0 and c["a"]["hypervolume_true"] == pytest.approx(0.04)
    assert c["b"]["hypervolume_published"] == pytest.approx(0.04) and c["b"]["hypervolume_true"] == pytest.approx(0.06)
    text = paper_metrics.format_paper_comparison(c, "base", "new")
    assert text.startswith("the paper's definitions") and "hv_pub(BUG): the hypervolume as published is a bug" in text
    assert text.splitlines()[3].split() == ["base", "0.667", "0.667", "0.0833", "0.00000", "0.04000"]
    empty = paper_metrics.paper_compare(a, [cmp_row("zz", 1, 1)])
    assert empty["n_matched"] == 0 and "matched prompts: 0" in paper_metrics.format_paper_comparison(empty)
