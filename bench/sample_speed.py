"""Generation speed: our KV-cache sampler against transformers' `generate`, same weights, prompts and settings.

    python bench/sample_speed.py                   # CPU: ~55M-parameter random model, batch 16, 128 new tokens
    python bench/sample_speed.py --gpu-preset      # GPU: Qwen2.5-0.5B shape, bf16, batch 64, 128-token prompts, 256 new
    python bench/sample_speed.py --gpu-preset --decode eager     # our sampler without CUDA graphs
    python bench/sample_speed.py --batch 4 --new-tokens 32 --repeats 3 --ragged

A random-weight model is built with our ModelConfig, written with our save_pretrained, and then loaded
by both sides from that directory. EOS is disabled so every row generates exactly --new-tokens tokens.
Two settings: greedy, and sampling (temperature 1.0, top-p 0.95, no top-k). On a CPU our sampler runs
its linear layers on oneDNN-packed weights by default; the table also shows it with pack_weights=False. Each timing is the best
of --repeats interleaved rounds (ours and theirs alternate, so load from other processes hits both)
after a short warm-up; tokens/s counts generated tokens (batch * new tokens) over the wall time,
prefill included on both sides. --ragged (on with --gpu-preset) also times prompts of different lengths
(--prompt-len down to half of it, left-padded for transformers, as GRPO's are). Our sampler decodes the
way `generate(decode=...)` picks (--decode; auto: CUDA graphs on a GPU, eager on a CPU).
Needs transformers (a test/bench dependency).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nano_gtalign.loader import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from nano_gtalign.cpu_packing import onednn_packing_applies  # noqa: E402
from nano_gtalign.model import Transformer  # noqa: E402
from nano_gtalign.model_config import ModelConfig  # noqa: E402
from nano_gtalign.sampling import DECODE_MODES, SamplingParams, generate, resolve_decode  # noqa: E402
from nano_gtalign.tokenizer import Tokenizer  # noqa: E402

CPU_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
QWEN25_05B_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                        rope_theta=1000000.0)
SETTINGS = {  # name -> (our SamplingParams fields, transformers generate kwargs)
    "greedy": (dict(temperature=0.0), dict(do_sample=False)),
    "sampling": (dict(temperature=1.0, top_p=0.95), dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0)),
}


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer covering every id of the model (the sampler decodes its outputs)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer.from_tokenizers(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_checkpoint(shape: dict, dtype: torch.dtype, path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(max_position_embeddings=4096, eos_token_id=2, pad_token_id=0, **shape)
    model = Transformer(config).to(dtype)
    save_pretrained(model, word_tokenizer(config.vocab_size), path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(model, tok, prompts: list[list[int]], new_tokens: int, fields: dict, pack: bool | None = None,
             decode: str = "auto") -> torch.Tensor:
    params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=(), seed=0, **fields)
    out = generate(model, tok, prompts, params, pack_weights=pack, decode=decode)
    assert out.completion_ids.shape == (len(prompts), new_tokens) and bool(out.completion_mask.all())
    return out.completion_ids.cpu()


def run_hf(hf, prompts: list[list[int]], new_tokens: int, kwargs: dict, device: str) -> torch.Tensor:
    width = max(len(p) for p in prompts)  # left padding (id 0), masked out, for ragged prompts
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None,
                      pad_token_id=0, **kwargs)[:, width:].cpu()
    assert out.shape == (len(prompts), new_tokens), f"transformers generated {tuple(out.shape)}"
    return out


def ragged(prompts: list[list[int]]) -> list[list[int]]:
    """Row i keeps its last L_i tokens, L_i falling evenly from the full length to half of it."""
    n, full = len(prompts), len(prompts[0])
    return [p[len(p) - (full - (i * (full // 2)) // max(1, n - 1)):] for i, p in enumerate(prompts)]


def best_of(runs: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """Best wall time of each run over `repeats` rounds, interleaved so that load from other
    processes on a shared machine hits both sides alike."""
    best, outputs = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outputs


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-preset", action="store_true", help="Qwen2.5-0.5B shape, bf16, batch 64, 128+256 tokens")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per setting; the best is kept")
    p.add_argument("--device", default=None, help="default: cuda with --gpu-preset, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--settings", default="greedy,sampling", help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=None,
                   help="also time ragged prompts (default: on with --gpu-preset)")
    p.add_argument("--decode", default="auto", choices=DECODE_MODES, help="our decode path (generate's decode=)")
    args = p.parse_args()
    gpu = args.gpu_preset
    args.shape = QWEN25_05B_SHAPE if gpu else CPU_SHAPE
    args.dtype = torch.bfloat16 if gpu else torch.float32
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.batch = args.batch or (64 if gpu else 16)
    args.prompt_len = args.prompt_len or (128 if gpu else 64)
    args.new_tokens = args.new_tokens or (256 if gpu else 128)
    args.settings = args.settings.split(",")
    args.ragged = gpu if args.ragged is None else args.ragged
    for s in args.settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r} (choose from {', '.join(SETTINGS)})")
    return args


def main() -> None:
    args = parse_args()
    shape, dtype, device, batch = args.shape, args.dtype, args.device, args.batch
    new_tokens = args.new_tokens
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(shape, dtype, Path(tmp))
        ours = load_pretrained(tmp, device=device)
        tok = load_tokenizer(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab_size"], (batch, args.prompt_len), generator=g).tolist()
    params_m = sum(t.numel() for t in ours.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    print(f"device: {device} ({where}), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"model: {params_m:.1f}M params {shape}, {str(dtype).removeprefix('torch.')}")
    print(f"batch {batch}, prompt {args.prompt_len} tokens, {new_tokens} new tokens, EOS disabled, "
          f"best of {args.repeats}, our decode={args.decode}")
    if args.ragged:
        print(f"ragged rows: prompts of {args.prompt_len} down to {args.prompt_len - args.prompt_len // 2} tokens, "
              "left-padded")
    print()
    # Where oneDNN weight packing applies (CPU), also time our sampler without it, to show what it buys.
    plain_too = onednn_packing_applies(ours) and resolve_decode(args.decode, torch.device(device)) == "eager"
    if plain_too:
        print("ours = default (linear layers on oneDNN-packed weights); ours plain = pack_weights=False (F.linear)")
        print()
    print(f"| setting  | transformers tok/s |{' ours plain tok/s |' if plain_too else ''} nano-gtalign tok/s "
          f"| ratio | same tokens |")
    print(f"|----------|-------------------:|{'-----------------:|' if plain_too else ''}-------------------:"
          f"|------:|-------------|")
    batches = [("", prompts)] + ([(" ragged", ragged(prompts))] if args.ragged else [])
    for suffix, rows in batches:
        for name in args.settings:
            print(table_row(name, suffix, ours, tok, hf, rows, new_tokens, args.repeats, device, plain_too,
                            args.decode), flush=True)


def table_row(name: str, suffix: str, ours, tok, hf, prompts: list[list[int]], new_tokens: int, repeats: int,
              device: str, plain_too: bool, decode: str) -> str:
    """Time one setting on both sides (and ours unpacked when plain_too); the markdown table row."""
    ours_fields, hf_kwargs = SETTINGS[name]
    runs = {"hf": lambda: run_hf(hf, prompts, new_tokens, hf_kwargs, device),
            "ours": lambda: run_ours(ours, tok, prompts, new_tokens, ours_fields, decode=decode)}
    if plain_too:
        runs["plain"] = lambda: run_ours(ours, tok, prompts, new_tokens, ours_fields, pack=False, decode=decode)
    # Warm-up (allocator, thread pools, first-call paths, CUDA-graph capture and compilation) with a few tokens.
    run_hf(hf, prompts, 4, hf_kwargs, device)
    run_ours(ours, tok, prompts, 4, ours_fields, decode=decode)
    best, out = best_of(runs, repeats, device)
    n = len(prompts) * new_tokens
    # Greedy outputs should agree token for token (fp32); sampling uses different random streams.
    same = f"{(out['hf'] == out['ours']).float().mean().item():.1%}" if name == "greedy" else "n/a"
    plain = f" {n / best['plain']:17.1f} |" if plain_too else ""
    label = name + suffix
    return (f"| {label:<8} | {n / best['hf']:18.1f} |{plain} {n / best['ours']:18.1f} "
            f"| {best['hf'] / best['ours']:5.2f} | {same:<11} |")


if __name__ == "__main__":
    main()
