"""nano_gtalign/metrics.py against hand-computed numbers."""
import math
import random
from types import SimpleNamespace

import pytest

from nano_gtalign import metrics
from nano_gtalign.game import KEYS

PAY = ('{"DQ_AQ": {"LLM": 2, "user": 2}, "DQ_CQ": {"LLM": 1, "user": 1}, "DQ_DA": {"LLM": 3, "user": 3}, '
       '"VQ_AQ": {"LLM": 1, "user": 1}, "VQ_CQ": {"LLM": 1, "user": 1}, "VQ_DA": {"LLM": 1, "user": 1}}')
RECORD = {"data_source": "math-hard", "prompt": [{"role": "user", "content": "What is 37 + 48?"}]}


def bd(**kw):
    base = dict(format=1.0, user=0.64, llm=0.25, welfare=0.4, answer_user=1.0, answer_llm=1.0,
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
    return {"prompt_id": pid, "data_source": src, "format": fmt, "parse_ok": parse, "judge_failed": failed,
            "answer_llm": a, "answer_user": a, "user": u, "llm": l, "w_cd": math.sqrt(u * l), "w_linear": (u + l) / 2,
            "welfare": math.sqrt(u * l), "pareto_consistency": pc, "action": action,
            "reasoning_chars": rc, "response_words": rw, "reasoning_tokens": rt, "response_tokens": st, "total_tokens": tt}


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
