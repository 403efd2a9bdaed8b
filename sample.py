"""Sample a completion from a checkpoint (ours or any Hugging Face Qwen2/Qwen3 directory).

    python sample.py --prompt "What is 37 + 48?"                  # the demo model at out/demo/final
    python sample.py --model DIR --prompt "What is 37 + 48?" --temperature 0
    python sample.py --model DIR --prompt "What is 37 + 48?" --temperature 0.7 --top-p 0.9 --seed 0
    python sample.py --model DIR --prompt "Once upon a time" --raw --max-new-tokens 64
    python sample.py --model DIR --prompt "Hi" --system "You are terse." --json

The prompt goes through the checkpoint's chat template as a user message (after an
optional --system message) unless --raw is given. --json prints one JSON object
(text, token_ids, logprobs, finish_reason, prompt_token_ids) and sends the config
lines to stderr, so stdout stays machine-readable.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nano_gtalign.loader import CheckpointError, load_pretrained, load_tokenizer
from nano_gtalign.sampling import Generation, SamplingParams, generate

DEFAULT_MODEL = "out/demo/final"  # where `python train.py` (the demo run) saves its final checkpoint
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingParams()
    p = argparse.ArgumentParser(description="Sample a completion from a checkpoint.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (default: %(default)s)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="encode --prompt as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); kept in the output")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a fresh random draw)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto = the checkpoint's dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of plain text")
    return p


def params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_strings=tuple(args.stop),
        seed=args.seed,
    )


def load_model(model_dir: str, device: str, dtype: str):
    """(model, tokenizer) or exit with a one-line message saying what is wrong."""
    path = Path(model_dir)
    if not path.is_dir():
        hint = ("run `python train.py` first (it saves the demo model there) or pass --model DIR"
                if model_dir == DEFAULT_MODEL else "pass --model DIR, a checkpoint directory with config.json")
        sys.exit(f"sample.py: no model directory at {model_dir}: {hint}")
    try:
        model = load_pretrained(path, dtype=DTYPES[dtype], device=device)
        tokenizer = load_tokenizer(path)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"sample.py: cannot load {model_dir}: {e}")
    return model.eval(), tokenizer


def prompt_ids(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    if raw:
        if system is not None:
            sys.exit("sample.py: --system needs the chat template; drop --raw or --system")
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def generate_text(model, tokenizer, ids: list[int], params: SamplingParams) -> dict:
    """One completion for one prompt, as the JSON-ready dict sample.py prints."""
    gen: Generation = generate(model, tokenizer, [ids], params)
    n = int(gen.completion_mask[0].sum())
    return {
        "text": gen.texts[0],
        "token_ids": gen.completion_ids[0, :n].tolist(),
        "logprobs": [round(x, 6) for x in gen.logprobs[0, :n].tolist()],
        "finish_reason": gen.finish_reasons[0],
        "prompt_token_ids": list(ids),
    }


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    log = sys.stderr if args.json else sys.stdout
    try:
        params = params_from_args(args)
    except ValueError as e:
        sys.exit(f"sample.py: {e}")
    print("config: " + " ".join(f"{k}={v!r}" for k, v in vars(args).items() if k != "prompt"), file=log)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    ids = prompt_ids(tokenizer, args.prompt, args.system, args.raw)
    t0 = time.perf_counter()
    try:
        result = generate_text(model, tokenizer, ids, params)
    except ValueError as e:  # e.g. prompt + max_new_tokens longer than the model's context
        sys.exit(f"sample.py: {e}")
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
    n = len(result["token_ids"])
    print(f"[{n} tokens, finish_reason={result['finish_reason']}, {n / seconds:.1f} tokens/s]", file=log)


if __name__ == "__main__":
    main()
