"""A small Qwen2 model directory for a dry run of the GTAlign pipeline on a CPU, built from the prepared data.

    python data/gtalign/tiny_model.py --data out/gtalign/train.jsonl --out out/tiny-qwen2
    python data/gtalign/tiny_model.py --data out/gtalign/train.jsonl --out out/tiny-qwen2 --format-steps 0  # random

It stands in for a downloaded checkpoint (Qwen2.5-0.5B-Instruct and up) where none is at hand: a byte-level
BPE trained on the records' rendered prompts with Qwen2's own pre-tokenizer (so transformers' AutoTokenizer
loads it as a Qwen2Tokenizer that tokenizes exactly as we do) and Qwen2.5's chat template, and a Qwen2 with
random weights. A random model never writes the four blocks, so nothing it says is ever judged; unless
--format-steps 0, a short supervised warm start teaches it the layout from made-up completions: a plausible
payoff matrix, its frontier and choice, and a response that only has the right shape (math answers are
boxed references, other answers generic sentences). The model learns the format, not the tasks: its
numbers say that the pipeline runs, nothing about GTAlign.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[2])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from data.demo.build import build_tokenizer, demo_model_config
from data.demo.sft import warm_start
from data.demo.transcripts import make_matrix
from nano_gtalign.data import read_records
from nano_gtalign.errors import UsageError
from nano_gtalign.game import format_payoff, pareto_frontier
from nano_gtalign.loader import save_pretrained
from nano_gtalign.model import Transformer
from nano_gtalign.tokenizer import QWEN2_PRETOKENIZE_REGEX, QWEN25_CHAT_TEMPLATE

MATH_SOURCES = ("math-hard", "minerva")
CLEAR_ANSWERS = ["Here is a direct answer to your question.", "The short answer follows from the facts given."]
CLARIFY = ["Could you say which meaning you intend?", "Which of these cases do you mean?"]
FOLLOW_UPS = ["Would you like more detail?", "Shall I go on?"]


def believed_type(record: dict) -> str:
    """VQ for a question the data marks as ambiguous, else DQ (the published labels; other sources have none)."""
    truth = str(record["reward_model"]["ground_truth"])
    return "VQ" if truth.startswith("multipleQAs") or truth == "ambiguous" else "DQ"


def format_completion(record: dict, rng: random.Random) -> str:
    """A four-block completion for record with the right layout and a sensible choice; its response is
    a boxed reference answer for math, a generic sentence (or a clarifying question) otherwise."""
    qtype = believed_type(record)
    target = rng.choice(["DQ_DA", "DQ_AQ"]) if qtype == "DQ" else "VQ_CQ"
    matrix = make_matrix(rng, qtype, target)
    strategy = target.split("_")[1]
    if strategy == "CQ":
        response = rng.choice(CLARIFY)
    elif record["data_source"] in MATH_SOURCES:
        response = f"The answer is $\\boxed{{{record['reward_model']['ground_truth']}}}$."
    else:
        response = rng.choice(CLEAR_ANSWERS)
    if strategy == "AQ":
        response += " " + rng.choice(FOLLOW_UPS)
    thinking = "The question is clear." if qtype == "DQ" else "The question can be read several ways."
    analyze = f"Frontier: {', '.join(pareto_frontier(matrix))}. Chosen: {target}, the largest LLM + user."
    return (f"<thinking>{thinking}</thinking><payoff>{format_payoff(matrix)}</payoff>"
            f"<analyze>{analyze}</analyze><response>{response}</response>")


def read_prepared(path: Path, limit: int, seed: int) -> list[dict]:
    """limit records of a prepared file (each checked by data.read_records), drawn at random with seed."""
    try:
        records = read_records(path)
    except UsageError as e:
        raise SystemExit(f"error: --data {e} (run data/gtalign/prepare.py first)") from None
    random.Random(seed).shuffle(records)
    return records[:limit]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="prepared JSONL (data/gtalign/prepare.py)")
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--records", type=int, default=2000, help="records drawn for the tokenizer and the warm start")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--format-steps", type=int, default=150, help="warm-start steps; 0 leaves the weights random")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="dtype written to disk")
    args = ap.parse_args(argv)
    for name in ("records", "vocab_size", "hidden_size", "layers", "max_positions", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.format_steps < 0 or not 0 <= args.seed < 2**32 or not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"need --format-steps >= 0, 0 <= --seed < 2^32 and a finite --lr > 0; got {args.format_steps}, "
                 f"{args.seed}, {args.lr}")
    print("tiny_model: " + " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    t0 = time.time()
    torch.manual_seed(args.seed)
    records = read_prepared(args.data, args.records, args.seed)
    rng = random.Random(args.seed)
    completions = [format_completion(r, rng) for r in records]
    texts = [m["content"] for r in records for m in r["prompt"]] + completions
    tokenizer = build_tokenizer(texts, args.vocab_size, split_regex=QWEN2_PRETOKENIZE_REGEX, nfc=True,
                                chat_template=QWEN25_CHAT_TEMPLATE)
    heads = max(2, args.hidden_size // 64)
    model = Transformer(demo_model_config(tokenizer.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                                          num_attention_heads=heads, num_key_value_heads=heads // 2,
                                          max_position_embeddings=args.max_positions))
    n_params = sum(p.numel() for p in model.parameters())
    lengths = sorted(len(tokenizer.encode_chat(r["prompt"])) for r in records)
    print(f"tokenizer: {tokenizer.vocab_size} tokens; prompts {lengths[0]}-{lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]}); model: {n_params / 1e6:.2f}M parameters", flush=True)
    if args.format_steps > 0:
        warm_start(model, tokenizer, records, completions, steps=args.format_steps, lr=args.lr,
                   batch_size=args.batch_size, seed=args.seed, log_every=25)
    save_pretrained(model, tokenizer, args.out, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.out} ({'random weights' if args.format_steps == 0 else 'format warm start'}, "
          f"{args.dtype}) in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
