"""The demo task `arith_demo`: arithmetic questions, some clear and some vague, as GTAlign records.

    python -m data.demo.task --out data/demo/out              # writes train.jsonl and test.jsonl
    python -m data.demo.task --out /tmp/arith --train 4000 --test 120 --seed 1

A clear question (DQ), "What is 7 + 9?", has one right answer ("16"). A vague question (VQ),
"Add 37 to my number.", cannot be answered: the only good move is to ask for the number, so its ground
truth is "vague". Clear questions use single-digit operands (see ADD_RANGE for why). The rule judge (nano_gtalign/judges.py) scores a DQ response 1 iff its last integer is the
answer, and a VQ response 1 iff it asks something ("?") and states no integer that is not in the question.

Records have the shape of the published GTAlign rows (docs/data.md) with data_source "arith_demo".
The four-block instruction in nano_gtalign/prompts.py is about 2,000 characters, far too long for the tiny
demo model to read on every prompt on a CPU, so the demo puts DEMO_SYSTEM_PROMPT (a compact form of the same
instruction) in the system message and the bare question in the user message.

Train and test are disjoint by question text: a question's split is a fixed hash of its text, so they never
overlap whatever the seeds and sizes.
"""
from __future__ import annotations

import argparse
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

DATA_SOURCE = "arith_demo"
VAGUE = "vague"

# The compact four-block instruction (see the module docstring for why it is not prompts.GAME_INSTRUCTION).
DEMO_SYSTEM_PROMPT = (
    "Reply in four blocks: <thinking>, <payoff>, <analyze>, <response>. Question DQ (clear) or VQ (vague); "
    "DA answer, CQ ask, AQ both. Pay LLM and user, choose the largest LLM + user, act on it."
)

OPS = ("+", "-", "×")
# Operand ranges of clear questions: single digits, so the answer is a function of the operator and the two
# digit tokens of the question, which the tiny demo model learns in its two-minute warm-start (with two-digit
# operands it needs the place value of four digits and learns nothing useful in that time).
ADD_RANGE = (1, 9)
MUL_RANGE = (2, 9)
# The number a vague question states is never computed with, so it can range widely (more distinct texts).
VAGUE_RANGE = (2, 99)
TEST_BUCKETS = 5  # one hash bucket in five is the test split (20% of the question space)

# Clear questions: {a} and {b} are both given.
CLEAR_TEMPLATES = {
    "+": ["What is {a} + {b}?", "Compute {a} + {b}.", "What do I get if I add {a} and {b}?",
          "How much is {a} plus {b}?"],
    "-": ["What is {a} - {b}?", "Subtract {b} from {a}.", "How much is {a} minus {b}?",
          "What do I get if I take {b} away from {a}?"],
    "×": ["What is {a} × {b}?", "Multiply {a} by {b}.", "How much is {a} times {b}?"],
}
# Vague questions: one operand is "my number", which the assistant cannot know. `left` says whether the
# unknown is the left operand (my number + 37) or the right one (37 - my number).
VAGUE_TEMPLATES = {
    "+": [("Add {k} to my number.", True), ("What is my number plus {k}?", True),
          ("What do I get if I add {k} to it?", True), ("Increase the number I picked by {k}.", True),
          ("What is {k} more than my number?", True)],
    "-": [("What do I get if I subtract {k} from it?", True), ("Take {k} away from my number.", True),
          ("What is {k} minus my number?", False), ("How much is my number minus {k}?", True),
          ("What is {k} less than the number I picked?", True)],
    "×": [("Multiply my number by {k}.", True), ("What is {k} times my number?", False),
          ("How much is my number times {k}?", True), ("What do I get if I multiply it by {k}?", True)],
}


@dataclass(frozen=True)
class Question:
    text: str
    question_type: str          # "DQ" | "VQ"
    op: str                     # "+" | "-" | "×"
    a: int | None               # left operand, None when it is the user's unknown number
    b: int | None               # right operand, None when it is the user's unknown number
    template: int               # index into the template list (kept for analysis)

    @property
    def answer(self) -> int | None:
        if self.a is None or self.b is None:
            return None
        return apply_op(self.op, self.a, self.b)

    @property
    def ground_truth(self) -> str:
        return VAGUE if self.question_type == "VQ" else str(self.answer)

    @property
    def unknown_left(self) -> bool:
        """For a vague question: is the user's number the left operand (my number - 5) or the right (5 - it)?"""
        return self.a is None


def apply_op(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "×":
        return a * b
    raise ValueError(f"unknown operator {op!r} (expected one of {' '.join(OPS)})")


def split_of(text: str) -> str:
    """"test" or "train", a fixed function of the question text (crc32 is stable across runs and machines)."""
    return "test" if zlib.crc32(text.encode("utf-8")) % TEST_BUCKETS == 0 else "train"


def sample_question(rng: random.Random, vague: bool) -> Question:
    op = rng.choice(OPS)
    if vague:
        t = rng.randrange(len(VAGUE_TEMPLATES[op]))
        template, unknown_left = VAGUE_TEMPLATES[op][t]
        k = rng.randint(*VAGUE_RANGE)
        a, b = (None, k) if unknown_left else (k, None)
        return Question(template.format(k=k), "VQ", op, a, b, t)
    lo, hi = MUL_RANGE if op == "×" else ADD_RANGE
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-" and a < b:  # keep answers non-negative: a leading "-" would be read as a dash
        a, b = b, a
    t = rng.randrange(len(CLEAR_TEMPLATES[op]))
    return Question(CLEAR_TEMPLATES[op][t].format(a=a, b=b), "DQ", op, a, b, t)


def make_record(q: Question, split: str, index: int) -> dict:
    """One record in the published shape (docs/data.md)."""
    return {
        "prompt": [{"role": "system", "content": DEMO_SYSTEM_PROMPT}, {"role": "user", "content": q.text}],
        "data_source": DATA_SOURCE,
        "ability": "arithmetic",
        "reward_model": {"ground_truth": q.ground_truth, "style": "rule"},
        "extra_info": {
            "single_turn_prompt": q.text,
            "question_type": q.question_type,
            "chat_history": [],
            "single_turn_completion": q.ground_truth,
            "op": q.op, "a": q.a, "b": q.b, "template": q.template,
            "split": split, "index": index,
        },
    }


def question_from_record(record: dict) -> Question:
    """Rebuild the Question a record was made from (transcripts.py needs the operands)."""
    if record.get("data_source") != DATA_SOURCE:
        raise ValueError(f"not an {DATA_SOURCE} record: data_source={record.get('data_source')!r}")
    x = record["extra_info"]
    return Question(x["single_turn_prompt"], x["question_type"], x["op"], x["a"], x["b"], x["template"])


def make_split(n: int, seed: int, split: str = "train", vague_frac: float = 0.5,
               distinct: bool | None = None) -> list[dict]:
    """n questions of one split, about vague_frac of them vague; same arguments -> same records.

    distinct=True draws each question text at most once; the default is True for "test" (every held-out
    question counts once) and False for "train" (a training question may come back, as in several epochs).
    The question space is small (about 550 clear and 1,100 vague train texts, 140 and 270 test texts), so a
    large distinct split fails with a clear error.
    """
    if distinct is None:
        distinct = split == "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0 or not 0.0 <= vague_frac <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= vague_frac <= 1, got n={n}, vague_frac={vague_frac}")
    rng = random.Random(f"{split}:{seed}")
    seen: set[str] = set()
    records: list[dict] = []
    tries = 0
    while len(records) < n:
        vague = rng.random() < vague_frac
        while True:  # redraw within the same question type so exhausting one type does not skew the mix
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"could not find {n} distinct {split} questions (vague_frac={vague_frac}); "
                                 f"ask for fewer or pass distinct=False")
            q = sample_question(rng, vague)
            if not (distinct and q.text in seen) and split_of(q.text) == split:
                break
        seen.add(q.text)
        records.append(make_record(q, split, len(records)))
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the arith_demo train/test JSONL files.")
    p.add_argument("--out", required=True, help="output directory (train.jsonl, test.jsonl)")
    p.add_argument("--train", type=int, default=1000, help="number of training questions (may repeat)")
    p.add_argument("--test", type=int, default=100, help="number of held-out questions (distinct)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vague-frac", type=float, default=0.5, help="fraction of vague (VQ) questions")
    args = p.parse_args(argv)
    if args.train < 1 or args.test < 1 or not 0 <= args.vague_frac <= 1 or not 0 <= args.seed < 2**32:
        p.error(f"need --train >= 1, --test >= 1, 0 <= --vague-frac <= 1 and 0 <= --seed < 2^32; got {args.train}, "
                f"{args.test}, {args.vague_frac}, {args.seed}")
    print(f"arith_demo: {vars(args)}")
    for split, n in (("train", args.train), ("test", args.test)):
        records = make_split(n, args.seed, split, args.vague_frac)
        path = write_jsonl(records, Path(args.out) / f"{split}.jsonl")
        vq = sum(r["extra_info"]["question_type"] == "VQ" for r in records)
        print(f"wrote {path}: {len(records)} records ({vq} vague)")


if __name__ == "__main__":
    main()
