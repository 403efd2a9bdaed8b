"""The demo's tokenizer (a byte-level BPE trained on the task's own text) and its tiny Qwen2-style model config.

Used by train.py's built-in demo:
    texts = demo_corpus(records, [t.completion for t in transcripts])
    tokenizer = build_tokenizer(texts)
    model = Transformer(demo_model_config(tokenizer.vocab_size))
"""
from __future__ import annotations

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nano_gtalign.model_config import ModelConfig
from nano_gtalign.tokenizer import CHATML_TEMPLATE, Tokenizer, compile_template

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Pre-tokenization pieces: a block tag ('<response>'), else a one-decimal payoff number (' -0.5'), else one
# digit (never with a leading space, so a digit is the same token in the question and in the answer), else a
# word with its leading space and attached punctuation (' {"LLM":', ' user.') that stops before a tag, else a
# run of whitespace. Words and whole payoff numbers keep completions short (about 90 tokens, so a CPU
# generates them fast). Tags stand alone so that a text cut right after one (steering continues from
# '...</analyze><response>') encodes as it did in training, not as a never-seen piece of 'user.</analyze><response>The'.
_TAG = r"</?(?:thinking|payoff|analyze|response)>"
PRETOKENIZE = _TAG + r"| ?-?\d\.\d(?!\d)|\d| ?(?:(?!" + _TAG + r")[^\s\d])+|\s+"


def demo_corpus(records: list[dict], completions: list[str]) -> list[str]:
    """Texts to train the tokenizer on: each record's ChatML-rendered prompt followed by its completion."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    template = compile_template(CHATML_TEMPLATE)
    return [template.render(messages=r["prompt"], add_generation_prompt=True) + c + EOS_TOKEN
            for r, c in zip(records, completions)]


def build_tokenizer(texts: list[str], vocab_size: int = 1024, *, split_regex: str = PRETOKENIZE, nfc: bool = False,
                    chat_template: str = CHATML_TEMPLATE) -> Tokenizer:
    """Train a byte-level BPE on texts. Any byte sequence stays encodable (all 256 bytes are in the base
    alphabet), so whatever the policy samples decodes. The trainer stops early when no pair occurs twice,
    so the final vocabulary can be smaller than vocab_size.

    split_regex pre-splits the text (the demo's pieces by default; QWEN2_PRETOKENIZE_REGEX with nfc=True
    builds a tokenizer that transformers' Qwen2Tokenizer reproduces)."""
    if not texts:
        raise ValueError("build_tokenizer needs at least one text")
    base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size <= base:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges (the byte alphabet and specials "
                         f"already take {base})")
    tok = HFTokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer.from_tokenizers(tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, chat_template=chat_template)


def demo_model_config(vocab_size: int, hidden_size: int = 128, num_hidden_layers: int = 4,
                      num_attention_heads: int = 4, num_key_value_heads: int = 2,
                      max_position_embeddings: int = 512) -> ModelConfig:
    """A tiny Qwen2: about 0.9M parameters with the demo vocabulary (~900 tokens), tied embeddings.

    Sized so the warm-start (300 steps of 16: about 40 s on 2 CPU cores) and GRPO fit in 10 minutes; a prompt
    plus completion is under 200 tokens, hence the short max_position_embeddings.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        attention_bias=True, qk_norm=False, model_type="qwen2",
        bos_token_id=None, eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN), pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    )
