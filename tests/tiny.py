"""Builders for tiny Hugging Face artifacts used across the tests.

Nothing here downloads anything: the tokenizer is trained on a few sentences with
the `tokenizers` library and the models get random weights. `make_hf_model` uses
transformers (a test-only dependency) so that our loader is checked against
files written by the reference implementation.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from nano_gtalign.tokenizer import QWEN25_CHAT_TEMPLATE

# Qwen2.5's template with a shorter default system prompt (tests compare rendered text against it).
QWEN_CHAT_TEMPLATE = QWEN25_CHAT_TEMPLATE.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                                                  "You are a helpful assistant.")
assert QWEN_CHAT_TEMPLATE != QWEN25_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "What is 37 + 48? The answer is 85.",
    "Add 37 to my number. Could you tell me your number?",
    "<thinking>The question is clear.</thinking><payoff>{\"DQ_DA\": {\"LLM\": 3.1, \"user\": 2.5}}</payoff>",
    "<analyze>Pareto frontier: DQ_DA, DQ_AQ. Choose DQ_DA.</analyze><response>85</response>",
    "The quick brown fox jumps over the lazy dog. Hello world, hello tokens!",
    "system user assistant You are a helpful assistant.",
] * 20


def make_tokenizer(path: str | Path, vocab_size: int = 300, chat_template: str | None = QWEN_CHAT_TEMPLATE) -> Path:
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 4096,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def make_hf_model(
    path: str | Path,
    arch: str = "qwen2",
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    seed: int = 0,
    with_tokenizer: bool = True,
    **overrides,
) -> Path:
    """Save a tiny random Qwen2, Qwen3 or Llama model (and tokenizer) with transformers. overrides go to the
    transformers config (e.g. rope_scaling, attention_bias, mlp_bias for llama)."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        make_tokenizer(path)
        from tokenizers import Tokenizer

        vocab_size = vocab_size or Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    vocab_size = vocab_size or 300
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    common.update(copy.deepcopy(overrides))  # transformers fills rope_theta into a rope_scaling dict it is given
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        common.setdefault("head_dim", 32)
        config = transformers.Qwen3Config(**common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    # Random init of norms is all ones; perturb them so a missing norm is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model = model.to(getattr(torch, dtype))
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path
