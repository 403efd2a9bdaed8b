"""Sample a completion from a checkpoint (ours or any Hugging Face Qwen2/Qwen3/Llama directory).

    python sample.py --prompt "What is 37 + 48?"                  # the demo model at out/demo/final
    python sample.py --model DIR --prompt "What is 37 + 48?" --temperature 0
    python sample.py --model DIR --prompt "What is 37 + 48?" --temperature 0.7 --top-p 0.9 --seed 0
    python sample.py --model DIR --prompt "Once upon a time" --raw --max-new-tokens 64
    python sample.py --model DIR --prompt "Hi" --system "You are terse." --json
    python sample.py --prompt "What is 37 + 48?" --price upstream-llm:1.5 --temperature 0
    python sample.py --prompt "Add 37 to my number." --price token:per_1k=5,payer=user,DA=600,CQ=40,AQ=700
    python sample.py --model DIR --game-prompt full --prompt "Is coffee bad for you?" --price upstream-user:1 --json
    python sample.py --prompt "Add 5 to my number." --price upstream-llm:-2 --rule product --seed 0
    python sample.py --model DIR --record out/gtalign/test.jsonl:12 --temperature 0   # the 12th record, as trained
    python sample.py --model DIR --record out/gtalign/test.jsonl:12 --price upstream-user:1

--record FILE:N samples the Nth record (counting from 1, blank lines skipped: eval.py's "record N") of a
JSONL or parquet file of records (data/gtalign/prepare.py writes them): its own chat messages, system
message included, through the chat template exactly as training and eval.py send them. --system, --raw and
--game-prompt do not apply to it.

--price POLICY steers with prices (docs/steering.md, nano_gtalign/steering.py; the policies are listed
in --help): the model writes up to </payoff>, its matrix is repriced, the action is chosen
again (sign-safe Cobb-Douglas over the Pareto frontier; --rule sum for the prompt's max LLM + user;
--rule product for upstream's largest raw LLM x user over all six cells, ties drawn with --seed),
and the model writes its <response> after the rewritten <payoff> and an <analyze> stating the new
choice. The output shows both matrices side by side, the frontier and chosen cell before and
after, then the response; with --json one object (payoff_raw, payoff_priced, action_raw, action_priced,
response, text, ...). A payoff the model did not write or that does not parse is reported
with the raw text and exit status 0 (it is the model's answer, not a usage error).
--game-prompt says how the --price prompt is built: "demo" (default) puts the demo's compact
four-block instruction in the system message, as out/demo/final was trained (a line says so unless
--system is given); "full" puts the published four-block instruction around the question
(GTAlign-trained models); "none" sends --prompt/--system as they are. With --record the record's own
messages are steered as they are.

The prompt goes through the checkpoint's chat template as a user message (after an
optional --system message) unless --raw is given. --json prints one JSON object
(text, token_ids, logprobs, finish_reason, prompt_token_ids) and sends the config
lines to stderr, so stdout stays machine-readable.

A checkpoint that cannot be used (a bad config.json, NaN weights, a tokenizer file that does not parse, a
chat template that does not compile or fails to render) is one line naming the file, and exit status 2, as
train.py exits on one.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from data.demo import DEMO_MODEL, missing_model_hint
from nano_gtalign.data import read_records
from nano_gtalign.errors import UsageError
from nano_gtalign.loader import CheckpointError, load_pretrained, load_tokenizer
from nano_gtalign.sampling import Generation, SamplingParams, generate
from nano_gtalign.steering import PRICING_HELP, PricingError, SteerResult, format_side_by_side, parse_pricing, steer

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingParams()
    p = argparse.ArgumentParser(description="Sample a completion from a checkpoint.", epilog=PRICING_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help="checkpoint directory (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="the user message (or raw text with --raw)")
    p.add_argument("--record", default=None, metavar="FILE:N",
                   help="instead of --prompt: the Nth record of a records file (N counts from 1), its own messages")
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
    p.add_argument("--price", default=None, metavar="POLICY",
                   help="steer with a pricing policy (see below), e.g. upstream-llm:1.5 or token:per_1k=2,payer=user")
    p.add_argument("--rule", default="cobb_douglas", choices=["cobb_douglas", "sum", "product"],
                   help="with --price: how the cell is chosen before and after repricing: sign-safe Cobb-Douglas "
                        "over the frontier, max LLM + user, or upstream's largest raw LLM x user with ties drawn "
                        "with --seed (default: %(default)s)")
    p.add_argument("--game-prompt", default=None, choices=["demo", "full", "none"],
                   help="with --price: how the four-block instruction is added to --prompt (default: demo)")
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


def checkpoint_failed(message) -> NoReturn:
    """A checkpoint that cannot be used (its chat template included): one line and exit 2, as train.py."""
    print(f"sample.py: {message}", file=sys.stderr)
    sys.exit(2)


def load_model(model_dir: str, device: str, dtype: str):
    """(model, tokenizer) or exit with a one-line message saying what is wrong."""
    path = Path(model_dir)
    if not path.is_dir():
        sys.exit(f"sample.py: no model directory at {model_dir}: {missing_model_hint(model_dir)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"sample.py: --device {device} but torch sees no CUDA device; use --device cpu")
    try:
        model = load_pretrained(path, dtype=DTYPES[dtype], device=device)
        tokenizer = load_tokenizer(path)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        checkpoint_failed(f"cannot load {model_dir}: {e}")
    return model.eval(), tokenizer


def read_record(spec: str) -> tuple[list[dict], str]:
    """(chat messages, a line describing it) of the record FILE:N names; N counts from 1."""
    path, sep, n = spec.rpartition(":")
    if not sep or not path:
        sys.exit(f"sample.py: --record {spec}: give FILE:N, e.g. {spec}:1")
    if not n.isdigit():
        sys.exit(f"sample.py: --record {spec}: N must be a whole number (FILE:N, N counts from 1)")
    try:
        records = read_records(path)
    except UsageError as e:  # a missing or malformed file, named with its line
        sys.exit(f"sample.py: {e}")
    if not 1 <= int(n) <= len(records):
        sys.exit(f"sample.py: --record {spec}: the file has {len(records)} records (N counts from 1)")
    record = records[int(n) - 1]
    return record["prompt"], (f"record {n} of {path} (data_source {record['data_source']}, "
                              f"{len(record['prompt'])} messages)")


def check_prompt_flags(args) -> None:
    """Exactly one of --prompt and --record, and nothing that would change a record's messages."""
    if (args.prompt is None) == (args.record is None):
        sys.exit("sample.py: " + ("give --prompt or --record, not both" if args.prompt is not None
                                  else "give --prompt TEXT or --record FILE:N"))
    if args.record is None:
        return
    if args.system is not None:
        sys.exit("sample.py: --system: a --record brings its own messages")
    if args.raw:
        sys.exit("sample.py: --raw: a --record is sent through the chat template")
    if args.game_prompt is not None:
        sys.exit("sample.py: --game-prompt applies to --prompt; a --record is sent as training saw it")


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


def price_messages(prompt: str, system: str | None, game_prompt: str, log=None) -> list[dict]:
    """The chat messages for --price: the question wrapped in the four-block instruction. log (when given)
    hears that the demo's system prompt stands in for a missing --system."""
    if game_prompt == "demo" and system is None:
        from data.demo.task import DEMO_SYSTEM_PROMPT
        system = DEMO_SYSTEM_PROMPT
        if log is not None:
            print("--game-prompt demo: the system message is the demo's arithmetic instruction (data/demo/task.py); "
                  "pass --system, --game-prompt full|none, or --record FILE:N for a record's own", file=log)
    elif game_prompt == "full":
        from nano_gtalign.prompts import build_user_message
        prompt = build_user_message(prompt)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": prompt}]


def print_steering(result: SteerResult) -> None:
    print(f"policy: {result.policy}")
    if result.error is not None:
        print(f"steering stopped: {result.error}")
        if result.payoff_raw is not None:
            print(format_side_by_side(result))
        print("raw text:")
        print(result.stage_one)
        return
    print(format_side_by_side(result))
    print(f"response ({result.finish_reason}):")
    print(result.response)


def main_price(args, params: SamplingParams, log, record: list[dict] | None) -> None:
    """sample.py --price: two-stage steering of one prompt (nano_gtalign/steering.py); `record` is the
    --record's messages, steered as they are."""
    try:
        pricing = parse_pricing(args.price)
    except PricingError as e:
        sys.exit(f"sample.py: {e}")
    if args.raw:
        sys.exit("sample.py: --price needs the chat template; drop --raw")
    if args.stop:
        sys.exit("sample.py: --price sets its own stop strings (</payoff>, then </response>); drop --stop")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    messages = record or price_messages(args.prompt, args.system, args.game_prompt or "demo", log)
    t0 = time.perf_counter()
    try:
        result = steer(model, tokenizer, messages, pricing, params, generate_fn=generate, rule=args.rule,
                       rng=random.Random(args.seed))   # no --seed: a fresh draw, as upstream's random.choice
    except CheckpointError as e:  # the chat template failed to render (a ValueError too: caught first)
        checkpoint_failed(e)
    except ValueError as e:  # e.g. prompt + max_new_tokens longer than the model's context
        sys.exit(f"sample.py: {e}")
    if args.json:
        print(json.dumps({**result.to_json(), "messages": messages}, ensure_ascii=False))
    else:
        print_steering(result)
    print(f"[{time.perf_counter() - t0:.1f}s]", file=log)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    log = sys.stderr if args.json else sys.stdout
    try:
        params = params_from_args(args)
    except ValueError as e:
        sys.exit(f"sample.py: {e}")
    check_prompt_flags(args)
    print("config: " + " ".join(f"{k}={v!r}" for k, v in vars(args).items() if k != "prompt"), file=log)
    record = None
    if args.record is not None:
        record, what = read_record(args.record)
        print(what, file=log)
    if args.price is not None:
        return main_price(args, params, log, record)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    try:
        if record is not None:
            ids = tokenizer.encode_chat(record, add_generation_prompt=True)
        else:
            ids = prompt_ids(tokenizer, args.prompt, args.system, args.raw)
    except CheckpointError as e:  # the chat template failed to render
        checkpoint_failed(e)
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
