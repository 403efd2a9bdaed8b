"""Programmatic four-block completions for the demo's supervised warm-start, deliberately imperfect.

A clean transcript does the sensible thing: it classifies the question right (DQ or VQ), writes a payoff
matrix whose best cell (by the prompt's rule, max LLM + user) is DQ_DA or DQ_AQ for a clear question and
VQ_CQ for a vague one, states the Pareto frontier and that choice in <analyze>, and acts on it:

    DA  "The answer is 13."            CQ  "What is your number?"
    AQ  "The answer is 13. Do you want another one?"  (vague AQ: "It is your number + 37. What is your number?")

Noise, each independent and with the documented default rates of `make_transcripts`, makes the warm-started
policy do many things so that GRPO has something to improve:
    wrong_type     the question is classified as the other type; payoff, choice and response follow that
                   mistake (a clear question gets a clarifying question, a vague one gets a guessed answer)
    suboptimal     <analyze> picks a key other than the matrix's best one, and the response follows it
    long_thinking  <thinking> rambles on for several extra sentences (lower reasoning brevity)
    slip           an arithmetic slip: the stated result of a clear question is off by 1 to 5
Completions are short (about a hundred tokens with the demo tokenizer) so a tiny model generates them fast.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from data.demo.task import Question, apply_op, question_from_record
from nano_gtalign.game import KEYS, Matrix, choose_action, format_payoff, pareto_frontier

# Ranges (lo, hi) for (LLM, user) of each cell, by the question type the transcript believes in. The
# believed type's sensible cells are high, the other row low; exact values are random so matrices vary.
_RANGES = {
    "DQ": {"DQ_DA": ((2.5, 4.0), (2.5, 4.5)), "DQ_AQ": ((2.0, 3.5), (2.5, 4.0)), "DQ_CQ": ((0.5, 2.0), (-0.5, 1.5)),
           "VQ_AQ": ((-0.5, 1.5), (-1.0, 1.0)), "VQ_CQ": ((-1.0, 1.0), (-1.0, 1.0)), "VQ_DA": ((-1.0, 1.5), (-1.5, 0.5))},
    "VQ": {"VQ_CQ": ((2.0, 3.5), (2.5, 4.0)), "VQ_AQ": ((1.0, 2.5), (1.0, 2.5)), "VQ_DA": ((-1.0, 1.0), (-2.0, 0.5)),
           "DQ_AQ": ((-0.5, 1.5), (-1.0, 1.0)), "DQ_CQ": ((-0.5, 1.0), (-0.5, 1.0)), "DQ_DA": ((-0.5, 1.5), (-1.0, 1.0))},
}
DA_SHARE = 0.6  # a clean clear-question transcript intends DQ_DA this often, else DQ_AQ

THINKING = {
    "DQ": ["DQ: the question gives both numbers. DA answers at once; AQ adds a follow-up; CQ wastes a turn.",
           "The question is clear, so DQ. A direct answer is cheap and safe; asking would cost the user time."],
    "VQ": ["VQ: the user's number is missing. DA would have to guess; CQ asks for it; AQ cannot answer yet.",
           "The question is vague, so VQ. Without the number any answer is a guess; one question fixes it."],
}
RAMBLE = [
    "Let me think about this once more.",
    "Both players care about tokens, time and getting it right.",
    "A wrong answer costs the user the most, and a needless question costs a turn.",
    "I should weigh every option carefully before I commit to one.",
    "The user wants a quick and correct reply.",
    "Reading the question again, my view does not change.",
]
FOLLOW_UPS = ["Do you want another one?", "Shall I show the steps?", "Anything else to compute?"]
CLEAR_CQS = ["Which numbers do you mean?", "Do you want the exact result?"]
VAGUE_CQS = ["What is your number?", "Which number did you pick?", "Could you tell me your number?"]


@dataclass
class Transcript:
    completion: str
    believed_type: str          # the question type the transcript claims ("DQ" | "VQ")
    action: str                 # the key <analyze> chose (the response follows its strategy)
    best: str                   # the matrix's best key by the prompt's rule
    noise: tuple[str, ...]      # which kinds of noise were applied
    answer_ok: bool             # what the rule judge should say about the response


def _value(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 1) + 0.0  # + 0.0 turns -0.0 into 0.0 so the JSON never says -0.0


def make_matrix(rng: random.Random, believed_type: str, target: str) -> Matrix:
    """A random payoff matrix for believed_type whose best cell (choose_action, rule "sum") is target."""
    ranges = _RANGES[believed_type]
    while True:
        m = {k: (_value(rng, *ranges[k][0]), _value(rng, *ranges[k][1])) for k in KEYS}
        best = choose_action(m)
        m[best], m[target] = m[target], m[best]  # move the best point to the target cell
        if choose_action(m) == target and sum(m[target]) > max(sum(m[k]) for k in KEYS if k != target):
            return m  # a strict winner, so a tie-break never decides what the model should learn


def _guess(rng: random.Random, q: Question) -> int:
    """A made-up value for the user's number that keeps the result non-negative."""
    if q.op == "×":
        return rng.randint(2, 9)
    if q.op == "-" and q.a is None:  # my number - k: the guess must be at least k
        return q.b + rng.randint(0, 9)
    if q.op == "-":  # k - my number
        return rng.randint(0, q.a)
    return rng.randint(1, 9)


def write_response(rng: random.Random, q: Question, strategy: str, slip: bool) -> tuple[str, bool]:
    """The response for strategy on question q, and whether the rule judge should score it 1.

    A clear answer states only the result ("The answer is 85."): the result is a function of the operator
    and the unordered pair of operands (subtraction keeps a >= b), which a tiny model can read off the
    question by attending to its digits, while restating "37 + 48" first would need an ordered copy that
    takes it far longer to learn.
    """
    if q.question_type == "DQ":
        if strategy == "CQ":
            return rng.choice(CLEAR_CQS), False
        value = q.answer
        if slip:
            value = max(0, value + rng.choice([-1, 1]) * rng.randint(1, 5))
            if value == q.answer:
                value += 1
        text = f"The answer is {value}."
        return (text if strategy == "DA" else f"{text} {rng.choice(FOLLOW_UPS)}"), not slip
    if strategy == "CQ":
        return rng.choice(VAGUE_CQS), True
    if strategy == "AQ" and rng.random() < 0.5:  # a partial answer that adds no number, then the question
        symbolic = f"your number {q.op} {q.b}" if q.a is None else f"{q.a} {q.op} your number"
        return f"It is {symbolic}. {rng.choice(VAGUE_CQS)}", True
    guess = _guess(rng, q)  # a guessed answer states numbers the user never gave
    value = apply_op(q.op, guess, q.b) if q.a is None else apply_op(q.op, q.a, guess)
    text = f"If your number is {guess}, the answer is {value}."
    return (text if strategy == "DA" else f"{text} Is that your number?"), False


def write_transcript(q: Question, rng: random.Random, wrong_type: float = 0.15, suboptimal: float = 0.15,
                     long_thinking: float = 0.2, slip: float = 0.15) -> Transcript:
    noise = []
    believed = q.question_type
    if rng.random() < wrong_type:
        believed = "VQ" if believed == "DQ" else "DQ"
        noise.append("wrong_type")
    target = ("DQ_DA" if rng.random() < DA_SHARE else "DQ_AQ") if believed == "DQ" else "VQ_CQ"
    matrix = make_matrix(rng, believed, target)
    action = target
    if rng.random() < suboptimal:
        action = rng.choice([k for k in KEYS if k != target])
        noise.append("suboptimal")
    thinking = rng.choice(THINKING[believed])
    if rng.random() < long_thinking:
        thinking += " " + " ".join(rng.sample(RAMBLE, rng.randint(2, 4)))
        noise.append("long_thinking")
    strategy = action.split("_")[1]
    slipped = q.question_type == "DQ" and strategy != "CQ" and rng.random() < slip
    if slipped:
        noise.append("slip")
    response, ok = write_response(rng, q, strategy, slipped)
    analyze = f"Frontier: {', '.join(pareto_frontier(matrix))}. Chosen: {action}, the largest LLM + user."
    completion = (f"<thinking>{thinking}</thinking><payoff>{format_payoff(matrix)}</payoff>"
                  f"<analyze>{analyze}</analyze><response>{response}</response>")
    return Transcript(completion, believed, action, target, tuple(noise), ok)


def make_transcripts(records: list[dict], seed: int = 0, wrong_type: float = 0.15, suboptimal: float = 0.15,
                     long_thinking: float = 0.2, slip: float = 0.15) -> list[Transcript]:
    """One transcript per arith_demo record, reproducible from seed.

    Noise rates (independent per transcript; defaults give about half the transcripts some flaw):
        wrong_type=0.15     misclassify DQ <-> VQ
        suboptimal=0.15     <analyze> chooses a non-best key
        long_thinking=0.2   <thinking> gets 2 to 4 extra sentences
        slip=0.15           wrong arithmetic in an answer to a clear question
    """
    for name, p in (("wrong_type", wrong_type), ("suboptimal", suboptimal), ("long_thinking", long_thinking),
                    ("slip", slip)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise rate {name}={p} is not a probability in [0, 1]")
    rng = random.Random(seed)
    return [write_transcript(question_from_record(r), rng, wrong_type, suboptimal, long_thinking, slip)
            for r in records]
