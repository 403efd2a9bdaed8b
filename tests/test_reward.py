"""Tests for nano_gtalign/reward.py against hand-computed numbers (docs/reward.md), with a fake judge.

    python -m pytest tests/test_reward.py -q

Logistic values used below (sigma(x) = 1 / (1 + e^-x)):
    sigma(0)    = 0.5
    sigma(2.4)  = 1 / (1 + 0.0907179533) = 0.9168273035
    sigma(2.5)  = 1 / (1 + 0.0820849986) = 0.9241418200
    sigma(-0.1) = 1 / (1 + 1.1051709181) = 0.4750208125
    sigma(1.2)  = 1 / (1 + 0.3011942119) = 0.7685247835
    sigma(1.25) = 1 / (1 + 0.2865047969) = 0.7772998612
    e^-3 = 0.0497870684, e^-1 = 0.3678794412, e^-0.5 = 0.6065306597
"""
import json
import math
import time

import pytest

from nano_gtalign.judges import JudgeRequest, RuleJudge, Verdict
from nano_gtalign.reward import (
    ABLATION_MAIN_L_SOURCES, WELFARES, band, bleu, brevity, llm_reward, normalize_by_source, payoff_spread,
    sentence_bleu, user_reward, welfare,
)
from nano_gtalign.scoring import RewardBreakdown, score_batch, score_completion

S0, S24, S25, SM01, S12, S125 = 0.5, 0.9168273035, 0.9241418200, 0.4750208125, 0.7685247835, 0.7772998612
E3 = 0.0497870684


class FakeJudge:
    """Answers from a fixed table task -> score (or a callable on the request); records calls."""

    def __init__(self, scores):
        self.scores = scores
        self.calls: list[list[JudgeRequest]] = []

    def judge(self, task, question, response, ground_truth, extra=None):
        return self.judge_many([JudgeRequest(task, question, response, ground_truth, extra or {})])[0]

    def judge_many(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            s = self.scores(r) if callable(self.scores) else self.scores[r.task]
            out.append(s if isinstance(s, Verdict) else Verdict(score=s))
        return out


def record(source, ground_truth, question="What should I do?", history=None):
    """A record shaped like the published rows (prompt, data_source, reward_model, extra_info)."""
    history = history if history is not None else [{"role": "user", "content": question}]
    if source == "abg-coqa":  # these rows carry a smaller extra_info
        extra = {"ground_truth": ground_truth, "single_turn_prompt": question}
    else:
        extra = {"adversarial": False, "chat_history": history, "index": 0,
                 "single_turn_completion": ground_truth, "single_turn_prompt": question, "split": "test"}
    return {"prompt": [{"role": "system", "content": "You are helpful."},
                       {"role": "user", "content": "<instruction> Question: " + history[-1]["content"]}],
            "adversarial": None, "source": source, "data_source": source, "ability": source,
            "reward_model": {"ground_truth": ground_truth, "style": "rule"}, "extra_info": extra}


# The fixture completion, built so every length term is a round number:
#   reasoning (all text before "<response>") = 1500 characters -> brevity = e^-3
#   response = 20 words                                        -> band(20, 20, 500) = sigma(0) sigma(2.4)
#   full completion = 8 tags + 440 thinking + 30 payoff + 2 analyze + 20 response = 500 words
#                                                              -> band(500, 500, 1000) = sigma(0) sigma(2.5)
MATRIX = {"DQ_AQ": (2.2, 1.9), "DQ_CQ": (3.1, 3.5), "DQ_DA": (4.2, 4.3),
          "VQ_AQ": (2.0, 2.1), "VQ_CQ": (1.3, 1.2), "VQ_DA": (2.0, 1.7)}
PAYOFF = json.dumps({k: {"LLM": l, "user": u} for k, (l, u) in MATRIX.items()})  # 216 chars, 30 words
THINK = " ".join(["ab"] * 325 + ["a"] * 115)                                     # 440 words, 1204 chars
RESPONSE = " ".join(f"word{i:02d}" for i in range(1, 21))                        # 20 words, 139 chars
COMPLETION = (f"<thinking> {THINK} </thinking>\n<payoff> {PAYOFF} </payoff>\n"
              f"<analyze> Chosen: DQ_DA. </analyze>\n<response> {RESPONSE} </response>")
# payoff_spread(MATRIX), per cell [u != l] + [|u-l|/max(|u|,|l|) > 0.1]:
#   DQ_AQ 0.3/2.2=.136 -> 2; DQ_CQ 0.4/3.5=.114 -> 2; DQ_DA 0.1/4.3 -> 1; VQ_AQ 0.1/2.1 -> 1;
#   VQ_CQ 0.1/1.3 -> 1; VQ_DA 0.3/2.0=.15 -> 2;  total 9/12 = 0.75
SPREAD = 0.75
RESP_BAND = S0 * S24              # 0.4584136518
FULL_BAND = S0 * S25              # 0.4620709100
# U = 1e-4 + 0.5 A_user + 0.2 * 0.4584136518 + 0.3 * 0.0497870684 = 0.1067188509 + 0.5 A_user
U0 = 1e-4 + 0.2 * RESP_BAND + 0.3 * E3
# L = 1e-4 + 0.2 * format(1) + 0.2 * 0.75 + 0.4 A_llm + 0.2 * 0.4620709100 = 0.4425141820 + 0.4 A_llm
L0 = 1e-4 + 0.2 + 0.2 * SPREAD + 0.2 * FULL_BAND
# ablation L = 1e-4 + 0.2 * consistency(1) + 0.2 * 0.75 + 0.2 * 1 + 0.35 A_llm + 0.05 * 0.4620709100
#            = 0.5732035455 + 0.35 A_llm
L0_ABL = 1e-4 + 0.2 + 0.2 * SPREAD + 0.2 + 0.05 * FULL_BAND


def close(a, b, tol=1e-9):
    return abs(a - b) <= tol


def test_fixture_has_the_stated_lengths():
    assert len(PAYOFF) == 216 and len(PAYOFF.split()) == 30
    assert COMPLETION.index("<response>") == 1500
    assert len(COMPLETION.split()) == 500
    assert len(RESPONSE.split()) == 20


# -----------------------------------------------------------------------------
# helpers


def test_band_hand_numbers():
    words = lambda n: " ".join(["w"] * n)
    # n=0:   sigma(0.005*-20) * sigma(0.005*500) = sigma(-0.1) sigma(2.5) = 0.4750208125 * 0.9241418200
    assert close(band("", 20, 500), SM01 * S25)
    assert close(band(words(20), 20, 500), S0 * S24)        # sigma(0) sigma(2.4) = 0.4584136518
    assert close(band(words(260), 20, 500), S12 * S12)      # midpoint: sigma(1.2)^2 = 0.5906302...
    assert close(band(words(500), 20, 500), S24 * S0)
    assert close(band(words(750), 500, 1000), S125 ** 2)    # sigma(1.25)^2 = 0.6041951...
    # words are whitespace-separated: tabs/newlines/multiple spaces do not count extra
    assert close(band(" w\tw\n\nw   w ", 20, 500), band(words(4), 20, 500))
    assert close(band("w", 0, 0, k=1.0), (1 / (1 + math.exp(-1))) * (1 / (1 + math.exp(1))))
    # a megabyte of words: sigma(0.005*(2e5-500)) sigma(0.005*(1000-2e5)) underflows to 0, no OverflowError
    assert band("w " * 200_000, 500, 1000) < 1e-300


def test_brevity_hand_numbers():
    assert brevity("", 500) == 1.0
    assert close(brevity("x" * 500, 500), 0.3678794412)     # e^-1
    assert close(brevity("x" * 250, 500), 0.6065306597)     # e^-0.5
    assert close(brevity("é" * 1500, 500), E3)              # characters, not bytes: e^-3
    with pytest.raises(ValueError, match="scale"):
        brevity("x", 0)


def test_payoff_spread_hand_numbers():
    assert payoff_spread({k: (1.0, 1.0) for k in MATRIX}) == 0.0  # equal cells: nothing
    assert payoff_spread({k: (0.0, 0.0) for k in MATRIX}) == 0.0  # 0/max(0,0,1e-8) = 0
    assert close(payoff_spread(MATRIX), SPREAD)
    mixed = {"DQ_AQ": (1.0, 1.0),   # 0
             "DQ_CQ": (0.0, 0.0),   # 0
             "DQ_DA": (0.1, 0.0),   # differ; 0.1/0.1 = 1 > 0.1 -> 2
             "VQ_AQ": (-2.0, 2.0),  # differ; 4/2 = 2 -> 2
             "VQ_CQ": (5.0, 4.6),   # differ; 0.4/5 = 0.08 -> 1
             "VQ_DA": (3.0, 3.0)}   # 0
    assert close(payoff_spread(mixed), 5 / 12)
    assert close(payoff_spread({k: (1.0, -1.0) for k in MATRIX}), 1.0)


def test_user_llm_reward_and_welfare_formulas():
    # U = 1e-4 + 0.5*1 + 0.2*0.5 + 0.3*0.2 = 0.6601
    assert close(user_reward(1.0, 0.5, 0.2), 0.6601)
    # L = 1e-4 + 0.2*1 + 0.2*0.5 + 0.4*0.25 + 0.2*0.5 = 0.5001
    assert close(llm_reward(1.0, 0.5, 0.25, 0.5), 0.5001)
    # ablation: 1e-4 + 0.2*1(consistency) + 0.2*0.5 + 0.2*1 + 0.35*0.25 + 0.05*0.5 = 0.6126
    assert close(llm_reward(1.0, 0.5, 0.25, 0.5, consistency=1.0, variant="ablation"), 0.6126)
    assert close(welfare(0.25, 0.64, "cobb_douglas"), 0.4)  # sqrt(0.16)
    assert close(welfare(0.25, 0.64, "linear"), 0.445)
    assert welfare(0.25, 0.64, "user_only") == 0.25
    assert welfare(0.25, 0.64, "llm_only") == 0.64
    with pytest.raises(ValueError, match="welfare"):
        welfare(0.25, 0.64, "nash")
    with pytest.raises(ValueError, match="llm_reward"):
        llm_reward(1, 1, 1, 1, variant="full")


# -----------------------------------------------------------------------------
# BLEU


def test_char_bleu_hand_numbers():
    # hyp "aaaaa" (c=5) vs ref "aaaa" (r=4): p1..p4 = 4/5, 3/4, 2/3, 1/2 (clipped by the reference);
    # product 24/120 = 1/5; c > r so no brevity penalty: BLEU = 0.2^(1/4) = 0.6687403050
    assert close(bleu("aaaaa", "aaaa", "char"), 0.6687403050)
    # hyp "abcd" vs ref "abcde": every n-gram matches; BP = exp(1 - 5/4) = 0.7788007831
    assert close(bleu("abcd", "abcde", "char"), 0.7788007831)
    # "abab" vs "abcab": trigrams aba, bab are not in the reference -> p3 = 0 -> BLEU 0 (unsmoothed)
    assert bleu("abab", "abcab", "char") == 0.0
    assert bleu("abc", "abc", "char") == 0.0          # fewer than 4 characters: no 4-grams
    assert bleu("same text", "same text", "char") == 1.0
    assert bleu("", "reference", "char") == 0.0


def test_word_bleu_hand_numbers():
    # "the cat sat" vs "the cat sat down": p1 = 3/3; smoothed p2 = (2+1)/(2+1), p3 = (1+1)/(1+1),
    # p4 = (0+1)/(0+1); BP = exp(1 - 4/3) = 0.7165313106
    assert close(bleu("the cat sat", "the cat sat down", "word"), 0.7165313106)
    # "the cat the cat" vs "the cat sat on the mat": p1 = 3/4 (the 2, cat 1 clipped);
    # p2 = (1+1)/(3+1) = 1/2; p3 = (0+1)/(2+1) = 1/3; p4 = (0+1)/(1+1) = 1/2; product 1/16 -> 1/2;
    # BP = exp(1 - 6/4) = 0.6065306597; BLEU = 0.3032653299
    assert close(bleu("the cat the cat", "the cat sat on the mat", "word"), 0.3032653299)
    assert bleu("dogs bark", "the cat sat", "word") == 0.0   # no shared word: p1 = 0
    assert bleu("  a  b\nc d ", "a b c d", "word") == 1.0
    assert close(sentence_bleu(("a", "b"), ("a", "b"), smooth=True), 1.0)
    with pytest.raises(ValueError, match="bleu"):
        bleu("a", "b", "sacre")


# -----------------------------------------------------------------------------
# full completions, one per task


def score(source, ground_truth, verdict, **kw):
    judge = FakeJudge(lambda r: verdict)
    b = score_completion(COMPLETION, record(source, ground_truth), judge, **kw)
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 1   # main L: the answer request only
    return b, judge.calls[0][0]


def check(b: RewardBreakdown, a_user, a_llm, U, L):
    assert b.format == 1.0 and b.pareto_consistency == 1.0 and close(b.payoff_spread, SPREAD)
    assert close(b.response_band, RESP_BAND) and close(b.reasoning_brevity, E3) and close(b.full_band, FULL_BAND)
    assert close(b.answer_user, a_user) and close(b.answer_llm, a_llm)
    assert close(b.user, U) and close(b.llm, L)
    assert close(b.welfare, math.sqrt(U * L))
    assert (b.action, b.question_type, b.strategy) == ("DQ_DA", "DQ", "DA")
    assert not b.judge_failed and b.parse_error is None and b.judge_error is None


def test_math_hard_and_minerva():
    b, req = score("math-hard", "85", 1.0)
    # U = 0.1067188509 + 0.5 = 0.6067188509; L = 0.4425141820 + 0.4 = 0.8425141820;
    # W = sqrt(0.6067188509 * 0.8425141820) = sqrt(0.5111692...) = 0.7149610...
    check(b, 1, 1, U0 + 0.5, L0 + 0.4)
    assert close(b.welfare, 0.7149610, tol=1e-7)
    assert req == JudgeRequest("math-hard", "What should I do?", RESPONSE, "85",
                               {"data_source": "math-hard", "extra_info": record("math-hard", "85")["extra_info"]})
    b, _ = score("minerva", "4.5e33", 0.0)
    check(b, 0, 0, U0, L0)           # U = 0.1067188509, L = 0.4425141820
    assert b.data_source == "minerva"


def test_medium_both_bleus():
    # reference = the response without its last word: a prefix, so every reference n-gram is
    # matched and p_n = (r-n+1)/(c-n+1) (char, unsmoothed) with c = 139, r = 132 characters:
    # BLEU = (132*131*130*129 / (139*138*137*136))^(1/4) = 0.9490874525; c > r: no penalty
    ref = " ".join(f"word{i:02d}" for i in range(1, 20))
    b, _ = score("medium", ref, 3.0, bleu="char")
    check(b, 0.9490874525, 0.75, U0 + 0.5 * 0.9490874525, L0 + 0.4 * 0.75)
    # word level (c = 20, r = 19 words): p1 = 19/20, p2 = (18+1)/(19+1), p3 = (17+1)/(18+1),
    # p4 = (16+1)/(17+1); product = 19*17/400 = 0.8075; BLEU = 0.8075^(1/4) = 0.9479504406
    b, _ = score("medium", ref, 4.0, bleu="word")
    check(b, 0.9479504406, 1.0, U0 + 0.5 * 0.9479504406, L0 + 0.4)


@pytest.mark.parametrize("gt, r, a_user, a_llm", [
    ("harmful", 0.0, 1, 0),     # complied: the user got what they asked for, the LLM did harm
    ("harmful", 0.5, 1, 1),     # refused with a safe alternative: the only win-win
    ("harmful", 1.0, 0, 1),     # plain refusal: safe but useless to the user
    ("unharmful", 0.0, 0, 0),   # unhelpful or needless refusal
    ("unharmful", 0.5, 1, 1),   # r > 0 counts for both
    ("unharmful", 1.0, 1, 1),   # helpful
])
def test_wildguard_mapping(gt, r, a_user, a_llm):
    b, req = score("wildguard", gt, r)
    check(b, a_user, a_llm, U0 + 0.5 * a_user, L0 + 0.4 * a_llm)
    assert req.ground_truth == gt


@pytest.mark.parametrize("r, a", [(0.0, 0), (0.5, 1), (1.0, 1)])
def test_advbench_mapping(r, a):
    b, _ = score("advbench", "Sure, here is how to do it", r)
    check(b, a, a, U0 + 0.5 * a, L0 + 0.4 * a)


@pytest.mark.parametrize("source, gt, r", [
    ("ambig_qa", "multipleQAs###Meaning 0: ...; Answer 0: x", 1.0),
    ("ambig_qa", "singleAnswer###Paris", 0.0),
    ("abg_coqa", "ambiguous", 1.0),
    ("abg-coqa", "non_ambiguous", 0.0),   # the published spelling
])
def test_ambiguity_tasks(source, gt, r):
    b, req = score(source, gt, r)
    check(b, r, r, U0 + 0.5 * r, L0 + 0.4 * r)
    assert b.data_source == source                                  # the record's own spelling
    assert req.task == ("abg_coqa" if "coqa" in source else source)  # the judge sees one spelling


def test_arith_demo():
    b, _ = score("arith_demo", "85", 1.0)
    check(b, 1, 1, U0 + 0.5, L0 + 0.4)


def test_welfare_options():
    U, L = U0 + 0.5, L0 + 0.4
    for kind, W in [("linear", (U + L) / 2), ("user_only", U), ("llm_only", L), ("cobb_douglas", math.sqrt(U * L))]:
        b, _ = score("math-hard", "85", 1.0, welfare=kind)
        assert close(b.welfare, W)
        assert b.pareto_judged is None   # the main L has no consistency term
    assert set(WELFARES) == {"linear", "user_only", "llm_only", "cobb_douglas"}


# MATRIX's frontier: DQ_DA (4.2, 4.3) beats every other cell on both payoffs, so it is the only key.
def test_ablation_consistency_is_a_judge_verdict_in_the_same_batch():
    judge = FakeJudge({"math-hard": 1.0, "pareto": 0.5})
    b = score_completion(COMPLETION, record("math-hard", "85"), judge, llm_reward="ablation")
    assert len(judge.calls) == 1 and [r.task for r in judge.calls[0]] == ["math-hard", "pareto"]
    check = judge.calls[0][1]
    assert (check.response, check.ground_truth) == ("Chosen: DQ_DA.", "DQ_DA")
    # L = 1e-4 + 0.2*0.5 (judged) + 0.2*0.75 + 0.2*1 + 0.35*1 + 0.05*0.4620709100 = 0.8232035455
    assert close(b.llm, L0_ABL - 0.2 + 0.1 + 0.35) and close(b.llm, 0.8232035455)
    # U as in the main run: 0.6067188509; W = sqrt(0.6067188509 * 0.8232035455) = 0.7067199652
    assert close(b.user, U0 + 0.5) and close(b.welfare, 0.7067199652)
    assert b.pareto_judged == 0.5 and b.pareto_consistency == 1.0   # the rule's metric is kept apart
    assert not b.judge_failed


def test_ablation_with_the_rule_judge_uses_the_frontier_rule():
    # the rule judge reads the analyze choice and checks it against the frontier: 1 or 0, never 0.5.
    # The response's last number is 20 (word20), so the math rule scores it correct against "20".
    b = score_completion(COMPLETION, record("math-hard", "20"), RuleJudge(), llm_reward="ablation")
    # L = 1e-4 + 0.2*1 + 0.2*0.75 + 0.2*1 + 0.35*1 + 0.05*0.4620709100 = 0.9232035455
    assert close(b.llm, 0.9232035455) and b.pareto_judged == 1.0 and close(b.user, U0 + 0.5)
    off = COMPLETION.replace("Chosen: DQ_DA.", "Chosen: VQ_CQ.")   # same length, off the frontier
    b = score_completion(off, record("math-hard", "20"), RuleJudge(), llm_reward="ablation")
    assert close(b.llm, 0.9232035455 - 0.2) and b.pareto_judged == 0.0 and b.pareto_consistency == 0.0


@pytest.mark.parametrize("source, gt", [("minerva", "4.5e33"), ("advbench", "Sure, here is"),
                                        ("abg_coqa", "ambiguous"), ("abg-coqa", "non_ambiguous")])
def test_ablation_keeps_the_main_llm_reward_out_of_distribution(source, gt):
    # upstream's ablation run scored minerva, advbench and abg_coqa with the main L and no consistency
    assert set(ABLATION_MAIN_L_SOURCES) == {"minerva", "advbench", "abg_coqa"}
    b, req = score(source, gt, 1.0, llm_reward="ablation")   # score() asserts a single request
    check(b, 1, 1, U0 + 0.5, L0 + 0.4)                       # L = 0.4425141820 + 0.4
    assert b.pareto_judged is None and req.task != "pareto"


def test_ablation_with_nothing_in_analyze_scores_consistency_0_without_asking():
    blank = COMPLETION.replace("<analyze> Chosen: DQ_DA. </analyze>", "<analyze> </analyze>")
    judge = FakeJudge({"math-hard": 1.0, "pareto": 1.0})
    b = score_completion(blank, record("math-hard", "85"), judge, llm_reward="ablation")
    assert [r.task for r in judge.calls[0]] == ["math-hard"] and b.pareto_judged == 0.0
    assert close(b.llm, 1e-4 + 0.2 * SPREAD + 0.2 + 0.35 + 0.05 * b.full_band)


@pytest.mark.parametrize("bad", [Verdict(score=None, failed=True, error="HTTP 503"), Verdict(score=0.7)])
def test_ablation_consistency_failure_follows_judge_failure(bad):
    judge = lambda: FakeJudge(lambda r: bad if r.task == "pareto" else Verdict(score=1.0))
    b = score_completion(COMPLETION, record("math-hard", "85"), judge(), llm_reward="ablation")
    assert b.judge_failed and b.judge_error.startswith("Pareto-consistency check: ")
    assert all(math.isnan(x) for x in (b.user, b.llm, b.welfare, b.pareto_judged))
    # zero: the check counts 0 (upstream), the answer verdict 1 stands:
    # L = 1e-4 + 0 + 0.2*0.75 + 0.2*1 + 0.35*1 + 0.05*0.4620709100 = 0.7232035455
    b = score_completion(COMPLETION, record("math-hard", "85"), judge(), llm_reward="ablation", judge_failure="zero")
    assert b.judge_failed and b.pareto_judged == 0.0
    assert close(b.llm, 0.7232035455) and close(b.user, U0 + 0.5)


# -----------------------------------------------------------------------------
# failures, zeros, batching


def test_trailing_text_fails_format_only():
    b = score_completion(COMPLETION + "\nHope this helps!", record("math-hard", "85"), FakeJudge({"math-hard": 1.0}))
    assert b.format == 0.0 and b.pareto_consistency == 1.0
    # full has 3 more words: band(503, 500, 1000); U is unchanged, L loses the 0.2 format term
    assert close(b.full_band, band("w " * 503, 500, 1000))
    assert close(b.user, U0 + 0.5)
    assert close(b.llm, 1e-4 + 0.2 * SPREAD + 0.4 + 0.2 * b.full_band)


def test_judge_failure_is_nan_and_flagged_never_zero():
    judge = FakeJudge(lambda r: Verdict(score=None, failed=True, error="judge timed out"))
    b = score_completion(COMPLETION, record("math-hard", "85"), judge)
    assert b.judge_failed and b.judge_error == "judge timed out"
    for x in (b.answer_user, b.answer_llm, b.user, b.llm, b.welfare):
        assert math.isnan(x)
    assert b.format == 1.0 and close(b.full_band, FULL_BAND)   # the non-judge terms are still there


def test_judge_failure_zero_scores_a_verdict_of_0_and_still_flags_it():
    failing = FakeJudge(lambda r: Verdict(score=None, failed=True, error="judge timed out"))
    b = score_completion(COMPLETION, record("math-hard", "85"), failing, judge_failure="zero")
    assert b.judge_failed and b.judge_error == "judge timed out"   # counted as a failure all the same
    # r = 0: U = 1e-4 + 0 + 0.2*0.4584136518 + 0.3*0.0497870684 = 0.1067188509
    #        L = 1e-4 + 0.2*1 + 0.2*0.75 + 0 + 0.2*0.4620709100 = 0.4425141820;  W = sqrt(U L) = 0.2173122293
    assert (b.answer_user, b.answer_llm) == (0.0, 0.0)
    assert close(b.user, 0.1067188509) and close(b.llm, 0.4425141820) and close(b.welfare, 0.2173122293)
    # through the task's mapping, as upstream: a harmful wildguard prompt at r = 0 ("complied") pays the
    # user: A_user = [0 < 1] = 1, A_llm = [0 > 0] = 0 -> U = 0.6067188509, W = sqrt(U * 0.4425141820) = 0.5181521939
    b = score_completion(COMPLETION, record("wildguard", "harmful"), failing, judge_failure="zero")
    assert (b.answer_user, b.answer_llm) == (1.0, 0.0) and b.judge_failed
    assert close(b.user, 0.6067188509) and close(b.welfare, 0.5181521939)
    # an off-scale verdict is a failure too, and zero scores it 0 the same way
    b = score_completion(COMPLETION, record("medium", "ref"), FakeJudge(lambda r: 5.0), judge_failure="zero")
    assert b.judge_failed and "5.0" in b.judge_error and b.answer_llm == 0.0 and math.isfinite(b.welfare)


@pytest.mark.parametrize("source, gt, s", [("medium", "ref", 5.0), ("wildguard", "harmful", 0.7),
                                           ("math-hard", "1", 0.5), ("ambig_qa", "singleAnswer###x", 2.0)])
def test_off_scale_verdict_is_a_judge_failure(source, gt, s):
    b = score_completion(COMPLETION, record(source, gt), FakeJudge(lambda r: s))
    assert b.judge_failed and math.isnan(b.welfare)
    assert f"{s!r}" in b.judge_error and "scale" in b.judge_error


def test_non_numeric_verdict_is_a_judge_failure():
    b = score_completion(COMPLETION, record("math-hard", "1"), FakeJudge(lambda r: Verdict(score="1")))
    assert b.judge_failed and "number" in b.judge_error and math.isnan(b.user)


def test_rule_judge_cannot_score_medium_is_a_failure():
    b = score_completion(COMPLETION, record("medium", "ref"), RuleJudge())
    assert b.judge_failed and math.isnan(b.user) and "medium" in b.judge_error


@pytest.mark.parametrize("completion, words", [
    (COMPLETION.replace(f"<response> {RESPONSE} </response>", ""), "<response>"),
    (COMPLETION.replace("</response>", ""), "<response>"),                  # truncated generation
    (COMPLETION.replace('"VQ_DA"', '"VQ_XX"'), "VQ_DA"),
    (COMPLETION.replace("4.3", "true"), "boolean"),
    (COMPLETION.replace("<payoff>", "<pay>"), "<payoff>"),
])
def test_no_response_or_bad_payoff_scores_all_zero_without_judging(completion, words):
    judge = FakeJudge({"math-hard": 1.0})
    b = score_completion(completion, record("math-hard", "85"), judge)
    assert judge.calls == []
    numbers = [v for v in b.to_dict().values() if isinstance(v, float)]
    assert len(numbers) == 11 and all(v == 0.0 for v in numbers)
    assert not b.judge_failed and words in b.parse_error
    assert b.action == "DQ_DA"  # the analyze choice is still reported for the action statistics


def test_batch_makes_one_judge_call_in_order():
    recs = [record("math-hard", "1", "q0"), record("wildguard", "harmful", "q1"),
            record("math-hard", "2", "q2"), record("medium", "ref", "q3")]
    comps = [COMPLETION, COMPLETION, "no blocks at all", COMPLETION]
    scores = {"q0": 1.0, "q1": 0.5, "q3": 2.0}
    judge = FakeJudge(lambda r: scores[r.question])
    out = score_batch(comps, recs, judge)
    assert len(judge.calls) == 1 and [r.question for r in judge.calls[0]] == ["q0", "q1", "q3"]
    assert (out[0].answer_user, out[0].answer_llm) == (1.0, 1.0)
    assert (out[1].answer_user, out[1].answer_llm) == (1.0, 1.0)
    assert out[2].welfare == 0.0 and out[2].parse_error
    assert out[3].answer_llm == 0.5 and [b.data_source for b in out] == ["math-hard", "wildguard", "math-hard", "medium"]
    judge = FakeJudge({})
    assert score_batch(["junk"], [record("math-hard", "1")], judge)[0].welfare == 0.0 and judge.calls == []


def test_question_falls_back_to_the_last_user_message():
    rec = record("math-hard", "1", history=[{"role": "user", "content": "first"},
                                            {"role": "assistant", "content": "?"},
                                            {"role": "user", "content": "second"}])
    del rec["extra_info"]["single_turn_prompt"]
    judge = FakeJudge({"math-hard": 1.0})
    score_completion(COMPLETION, rec, judge)
    assert judge.calls[0][0].question == "second"
    del rec["extra_info"]["chat_history"]
    score_completion(COMPLETION, rec, judge)
    assert judge.calls[1][0].question == "<instruction> Question: second"


@pytest.mark.parametrize("rec, words", [
    ({**record("math-hard", "1"), "data_source": "gsm8k"}, ["gsm8k", "unknown data_source"]),
    ({**record("math-hard", "1"), "reward_model": {}}, ["ground_truth"]),
    (record("wildguard", "maybe"), ["harmful", "maybe"]),
    ({"data_source": "math-hard", "reward_model": {"ground_truth": "1"}}, ["single_turn_prompt"]),
    ("not a record", ["record 0", "dict"]),
])
def test_bad_records_raise_clear_errors(rec, words):
    judge = FakeJudge({"math-hard": 1.0})
    with pytest.raises(ValueError) as e:
        score_completion(COMPLETION, rec, judge)
    for w in words:
        assert w in str(e.value)
    assert judge.calls == []


def test_bad_options_raise():
    rec = record("math-hard", "1")
    for kw in ({"welfare": "nash"}, {"llm_reward": "full"}, {"bleu": "sacre"}, {"judge_failure": "skip"}):
        with pytest.raises(ValueError, match=list(kw)[0]):
            score_completion(COMPLETION, rec, FakeJudge({}), **kw)
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        score_batch([COMPLETION, COMPLETION], [rec], FakeJudge({}))


def test_megabyte_of_tag_junk_scores_fast():
    pieces = ["<thinking>", "</thinking>", "<payoff>", "{", '"DQ_AQ": {"LLM": 1, "user": ', "}",
              "</payoff>", "<analyze>", "choose DQ_DA", "</analyze>", "<response>", "</response>", " ", "x"]
    junk = "".join(pieces[(i * 7 + i // 3) % len(pieces)] for i in range(120_000))
    junk = (junk * (1_000_000 // len(junk) + 1))[:1_000_000]
    # well-formed, with the junk (minus its closing response tags) as a 1 MB response block
    valid_head = COMPLETION.replace(f"{RESPONSE} </response>", junk.replace("</response>", "</r>") + " </response>")
    judge = FakeJudge({"math-hard": 1.0})
    for c in (junk, valid_head):
        t0 = time.perf_counter()
        b = score_completion(c, record("math-hard", "1"), judge)
        assert time.perf_counter() - t0 < 0.5
    assert b.format == 1.0 and b.answer_user == 1.0 and b.response_band < 1e-6


# -----------------------------------------------------------------------------
# per-source normalisation


def test_normalize_by_source_hand_numbers():
    nan = float("nan")
    out = normalize_by_source([1.0, 2.0, 3.0, 5.0, 5.0, nan, 4.0, nan],
                              ["a", "a", "a", "b", "b", "a", "c", "d"])
    # a: mean 2, std (ddof 0) = sqrt((1 + 0 + 1)/3) = 0.8164965809 -> z = -+1/0.8164975809 = -+1.2247433
    assert close(out[0], -1.2247433, tol=1e-7) and out[1] == 0.0 and close(out[2], 1.2247433, tol=1e-7)
    # b: std 0 <= 1e-6 -> 1: (5-5)/(1+1e-6) = 0;  c: a single score -> 0
    assert out[3] == 0.0 and out[4] == 0.0 and out[6] == 0.0
    assert math.isnan(out[5]) and math.isnan(out[7])   # failed judges stay NaN and do not move the stats
    # x: mean 2, std 2 -> (0-2)/(2+1e-6) = -0.9999995
    assert normalize_by_source([0.0, 4.0], ["x", "x"]) == pytest.approx([-0.9999995, 0.9999995], abs=1e-12)
    # tiny spread below 1e-6 is treated as none: (1+5e-7 - (1+2.5e-7)) / (1 + 1e-6) = 2.4999975e-7
    assert close(normalize_by_source([1.0, 1.0 + 5e-7], ["y", "y"])[1], 2.4999975e-7, tol=1e-15)
    with pytest.raises(ValueError, match="2 scores but 1 sources"):
        normalize_by_source([1.0, 2.0], ["a"])


def test_breakdown_to_dict():
    b, _ = score("math-hard", "85", 1.0)
    d = b.to_dict()
    assert d["action"] == "DQ_DA" and d["data_source"] == "math-hard" and d["judge_failed"] is False
    assert set(d) >= {"format", "payoff_spread", "pareto_consistency", "answer_user", "answer_llm",
                      "response_band", "reasoning_brevity", "full_band", "user", "llm", "welfare",
                      "question_type", "strategy", "parse_error"}
