"""Tests for nano_gtalign/prompts.py: the four-block instruction, and what each judge prompt shows the
judge — and must not show — per data source (docs/judges.md#judge-prompts).

    python -m pytest tests/test_prompts.py -q
"""
import pytest

from nano_gtalign.game import KEYS
from nano_gtalign.http_judge import _default_prompt
from nano_gtalign.judges import JudgeRequest, Verdict
from nano_gtalign.prompts import (
    GAME_INSTRUCTION, advbench_judge_prompt, ambiguity_label, build_user_message, judge_prompt,
    safety_judge_prompt,
)
from nano_gtalign.scoring import score_batch

PAY = ('{"DQ_AQ": {"LLM": 2.0, "user": 3.0}, "DQ_CQ": {"LLM": 1.0, "user": 1.5}, '
       '"DQ_DA": {"LLM": 3.0, "user": 2.0}, "VQ_AQ": {"LLM": 1.5, "user": 2.0}, '
       '"VQ_CQ": {"LLM": 0.5, "user": 1.0}, "VQ_DA": {"LLM": 2.0, "user": 0.5}}')
COMPLETION = (f"<thinking>Think.</thinking><payoff>{PAY}</payoff><analyze>Chosen: VQ_CQ.</analyze>"
              "<response>Which tone do you want?</response>")


def test_user_message_carries_the_game():
    for needle in (*KEYS, "<thinking>", "<payoff>", "<analyze>", "<response>", '"LLM"', '"user"',
                   "DQ", "VQ", "DA", "CQ", "AQ", "-5.0", "one decimal", "LLM + user"):
        assert needle in GAME_INSTRUCTION, needle
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "What is 2+2?"}]
    msg = build_user_message("What is 2+2?", history)
    assert msg.count("What is 2+2?") == 1 and msg.startswith("Conversation so far:\nUser: hi")
    assert msg.endswith("Question: What is 2+2?") and GAME_INSTRUCTION in msg
    assert build_user_message("Q?") == GAME_INSTRUCTION + "\n\nQuestion: Q?"
    with pytest.raises(ValueError, match="question"):
        build_user_message("  ")
    with pytest.raises(ValueError, match=r"chat_history\[0\]"):
        build_user_message("Q?", [{"text": "x"}])


def test_math_prompt_shows_question_reference_and_response():
    p = judge_prompt("math-hard", "QUESTION", "RESPONSE", "TRUTH")
    assert all(s in p for s in ("QUESTION", "RESPONSE", "TRUTH", "\\boxed{1}"))
    assert judge_prompt("minerva", "Q", "R", "4.5e33") == judge_prompt("math-hard", "Q", "R", "4.5e33")


MEDIUM_HISTORY = [{"role": "user", "content": "EARLIER-TURN can you help me with something?"},
                  {"role": "assistant", "content": "ASSISTANT-TURN Sure, what is it?"},
                  {"role": "user", "content": "LAST-MESSAGE write me something about crypto"}]


def test_medium_prompt_shows_intent_and_the_users_last_message():
    p = judge_prompt("medium", "INTENT: an article under 500 words on crypto in 2022", "RESPONSE", "REFERENCE",
                     extra_info={"chat_history": MEDIUM_HISTORY})
    for needle in ("INTENT: an article under 500 words", "LAST-MESSAGE write me something", "REFERENCE",
                   "RESPONSE", "0 to 4", "\\boxed{3}"):
        assert needle in p, needle
    # the intent is marked as hidden from the assistant; a clarifying question is preferred when vague
    assert "saw only the user's message, never the real goal" in p and "clarifying question is preferable" in p
    # as upstream: the last user message only, not the earlier turns
    assert "EARLIER-TURN" not in p and "ASSISTANT-TURN" not in p
    assert p.index("INTENT") < p.index("LAST-MESSAGE") < p.index("REFERENCE") < p.index("RESPONSE")


def test_medium_prompt_without_a_conversation_shows_the_request_once():
    for extra in (None, {}, {"chat_history": None}, {"chat_history": [{"role": "user", "content": "WRITE IT"}]}):
        p = judge_prompt("medium", "WRITE IT", "RESPONSE", "REFERENCE", extra_info=extra)
        assert p.count("WRITE IT") == 1 and "User's request" in p and "real goal]" not in p


def test_wildguard_prompt_shows_the_label_and_its_scale():
    harmful = judge_prompt("wildguard", "HOWTO", "RESPONSE", "harmful")
    unharmful = judge_prompt("wildguard", "HOWTO", "RESPONSE", "Unharmful")
    assert "HOWTO" in harmful and "harmful" in harmful and "0.5 - it declines" in harmful
    assert "unharmful" in unharmful and "0.5" not in unharmful.split("Score the response:")[1]
    with pytest.raises(ValueError, match="maybe"):
        judge_prompt("wildguard", "q", "r", "maybe")


def test_advbench_prompt_shows_the_harmful_label_not_the_jailbreak_target():
    target = "Sure, here is a script that can exploit vulnerabilities"
    p = judge_prompt("advbench", "Write an exploit script", "I can't help with that.", target)
    assert target not in p and "Sure, here is" not in p
    assert "Write an exploit script" in p and "[Request label]\nharmful" in p and "0.5 - it declines" in p
    # the same prompt a harmful WildGuard request gets, as upstream used one prompt for both
    assert p == safety_judge_prompt("Write an exploit script", "I can't help with that.", "harmful")
    assert p == advbench_judge_prompt("Write an exploit script", "I can't help with that.")


@pytest.mark.parametrize("task, gt, label, hidden", [
    ("ambig_qa", "multipleQAs###Q: Which Paris? A: PARIS-FRANCE | Q: Paris, Texas? A: PARIS-TEXAS", "ambiguous",
     ("PARIS-FRANCE", "PARIS-TEXAS", "multipleQAs", "###")),
    ("ambig_qa", "singleAnswer###SEED-COAT", "not ambiguous", ("SEED-COAT", "singleAnswer", "###")),
    ("abg_coqa", "ambiguous", "ambiguous", ()),
    ("abg-coqa", "non_ambiguous", "not ambiguous", ("non_ambiguous",)),
])
def test_ambiguity_prompt_shows_the_label_not_the_reference_answers(task, gt, label, hidden):
    p = judge_prompt(task, "Where is Paris?", "RESPONSE", gt)
    assert f"[Ambiguity label]\n{label}\n" in p and "Where is Paris?" in p and "<abg>1</abg>" in p
    for h in hidden:
        assert h not in p, h
    assert ambiguity_label(gt) == label


def test_ambiguity_label_refuses_an_unknown_head():
    for gt in ("perhaps", "maybe###x", ""):
        with pytest.raises(ValueError, match="multipleQAs"):
            judge_prompt("ambig_qa", "q", "r", gt)


def test_pareto_prompt_shows_the_frontier_and_the_analysis():
    p = judge_prompt("pareto", "QUESTION-TEXT", "I pick DQ_AQ: it is best for both.", "DQ_AQ, DQ_DA")
    assert "[Pareto-optimal strategies]\nDQ_AQ, DQ_DA\n" in p
    assert "I pick DQ_AQ: it is best for both." in p and "QUESTION-TEXT" not in p   # as upstream
    assert all(s in p for s in ("1 - ", "0.5 - ", "0 - ", "\\boxed{1}"))


def test_tasks_without_a_prompt():
    for task in ("arith_demo", "gsm8k"):
        with pytest.raises(ValueError):
            judge_prompt(task, "q", "r", "1")


class PromptCapturingJudge:
    """Builds the HTTP judge's default prompt for each request, as HTTPJudge would, and answers 1."""

    def __init__(self):
        self.prompts = []

    def judge_many(self, requests: list[JudgeRequest]):
        self.prompts += [_default_prompt(r) for r in requests]
        return [Verdict(score=1.0) for _ in requests]


def test_the_records_extra_info_reaches_the_prompt_through_the_reward():
    medium = {"data_source": "medium", "prompt": [{"role": "user", "content": "x"}],
              "reward_model": {"ground_truth": "REFERENCE"},
              "extra_info": {"single_turn_prompt": "INTENT", "chat_history": MEDIUM_HISTORY}}
    adv = {"data_source": "advbench", "prompt": [{"role": "user", "content": "x"}],
           "reward_model": {"ground_truth": "Sure, here is TARGET"},
           "extra_info": {"single_turn_prompt": "Write an exploit"}}
    judge = PromptCapturingJudge()
    out = score_batch([COMPLETION, COMPLETION], [medium, adv], judge, llm_reward="ablation")
    med_answer, med_pareto, adv_answer = judge.prompts   # advbench keeps the main L: no Pareto check
    assert "INTENT" in med_answer and "LAST-MESSAGE write me something" in med_answer
    assert "Which tone do you want?" in med_answer and "EARLIER-TURN" not in med_answer
    assert "Chosen: VQ_CQ." in med_pareto and "\nDQ_AQ, DQ_DA\n" in med_pareto
    assert "TARGET" not in adv_answer and "Write an exploit" in adv_answer
    assert not any(b.judge_failed for b in out)
