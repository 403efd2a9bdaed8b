"""Everything train.py's built-in demo needs before GRPO: task records, tokenizer, tiny model, warm-start.

    model, tokenizer, train, test = prepare_demo(seed=0, train_size=1000, test_size=64, sft_steps=300,
                                                 out_dir=Path("out/demo"), warm=True, d=Dist())

The synthetic arith_demo task (task.py), a BPE tokenizer trained on its text and a tiny Qwen2-style model
(build.py), then a short supervised pass over deliberately imperfect four-block transcripts (transcripts.py,
sft.py) so that GRPO starts from a model that writes the format. Every rank builds the same (seeded)
tokenizer and model; rank 0's weights are then broadcast so that the ranks start identical whatever float
differences the warm-start had. The held-out split is written to OUT_DIR/test.jsonl, where eval.py looks.

The warm-started model is also saved to OUT_DIR/warm_start (Hugging Face format): it is the KL reference
and the starting point, so a resumed demo (warm=False) loads it from there instead of training it again,
and continues exactly as an uninterrupted run would.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from data.demo.build import build_tokenizer, demo_corpus, demo_model_config
from data.demo.sft import warm_start
from data.demo.task import make_split, write_jsonl
from data.demo.transcripts import make_transcripts
from nano_gtalign.distributed import Dist, broadcast_module, print0
from nano_gtalign.errors import UsageError
from nano_gtalign.loader import load_pretrained, save_pretrained
from nano_gtalign.model import Transformer
from nano_gtalign.tokenizer import Tokenizer


def prepare_demo(*, seed: int, train_size: int, test_size: int, sft_steps: int, out_dir: Path, warm: bool,
                 d: Dist) -> tuple[Transformer, Tokenizer, list[dict], list[dict]]:
    """(model, tokenizer, train records, test records). warm=True trains the warm-start and saves it to
    OUT_DIR/warm_start; warm=False (resuming) loads it from there."""
    t0 = time.perf_counter()
    train = make_split(train_size, seed, "train")
    test = make_split(test_size, seed, "test")
    completions = [t.completion for t in make_transcripts(train, seed=seed)]
    tokenizer = build_tokenizer(demo_corpus(train, completions))
    torch.manual_seed(seed)
    model = Transformer(demo_model_config(tokenizer.vocab_size))
    print0(d, f"demo: {len(train)} train / {len(test)} test questions, vocab {tokenizer.vocab_size}, "
              f"model {model.num_parameters() / 1e6:.2f}M parameters")
    saved = out_dir / "warm_start"
    if warm:
        stats = warm_start(model, tokenizer, train, completions, steps=sft_steps, seed=seed,
                           log_every=25 if d.main else 0)
        print0(d, f"demo: warm-start {stats.steps} steps in {stats.seconds:.0f}s, "
                  f"loss {stats.first_loss:.3f} -> {stats.final_loss:.3f}")
    elif not (saved / "config.json").is_file():
        raise UsageError(f"{saved}: no saved warm-start to resume the demo from (it is the KL reference); "
                         "run the demo again without --resume")
    else:
        model.load_state_dict(load_pretrained(saved).state_dict())
        print0(d, f"demo: warm-start loaded from {saved}")
    broadcast_module(d, model)
    if d.main:
        write_jsonl(test, out_dir / "test.jsonl")
        if warm:
            save_pretrained(model, tokenizer, saved)
    print0(d, f"demo: ready in {time.perf_counter() - t0:.0f}s")
    return model, tokenizer, train, test
