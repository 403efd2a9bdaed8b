"""A Hugging Face `tokenizer.json` wrapped with the checkpoint's special tokens and chat template.

Text <-> ids goes through the `tokenizers` library; EOS/pad come from tokenizer_config.json and
generation_config.json; the chat template is rendered with jinja2 the way transformers'
`apply_chat_template(..., tokenize=False)` renders it, so prompts match what the model was trained on.
Decoding never applies `clean_up_tokenization_spaces` (Qwen checkpoints turn it off; it corrupts BPE text).

The chat template is the checkpoint's own code, run in jinja2's sandbox: a template that does not compile is
refused at load time, and one that fails while rendering (refused by the sandbox, an undefined name, its own
raise_exception) is a one-line CheckpointError naming the file it came from, as is any tokenizer file that is
not what it should be (tokenizer.json that does not parse, a config that is not a JSON object, ...).

Saving writes a tokenizer_config.json that makes transformers' AutoTokenizer tokenize exactly as we do
(`exact_load_config`): transformers 5 builds every qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which
replaces tokenizer.json's normalizer and pre-tokenizer with Qwen2's own, so a tokenizer that splits text
otherwise (the demo's, any GPT-2-style one) is pointed at a class that loads tokenizer.json unchanged.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers

from nano_gtalign.errors import CheckpointError

# Used when a checkpoint has no template of its own (plain ChatML, no default system prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct's chat template without its tool-calling branches: a default system prompt when the
# conversation has none, then ChatML. It renders the same text as the real one for conversations without tools.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# What transformers' Qwen2Tokenizer builds around the vocabulary and merges of tokenizer.json, ignoring the rest
# of the file (transformers 5, models/qwen2/tokenization_qwen2.py): NFC, this split, byte-level, plain BPE.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_BPE_OFF = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
                 "ignore_merges")  # BPE options Qwen2Tokenizer leaves unset

# The module an export's auto_map names (see exact_load_config). Only read with trust_remote_code=True; without
# it transformers uses tokenizer_class, which loads tokenizer.json the same way.
EXACT_MODULE = "tokenization_exact"
EXACT_MODULE_SOURCE = '''"""AutoTokenizer for this directory: tokenizer.json exactly as written (nano-gtalign).

Its normalizer and pre-tokenizer are not Qwen2's, and transformers builds a qwen2 model's tokenizer as
Qwen2Tokenizer, which would replace them; tokenizer_config.json's auto_map points here instead.
"""
from transformers import PreTrainedTokenizerFast


class ExactTokenizer(PreTrainedTokenizerFast):
    """PreTrainedTokenizerFast, under a name auto_map can point to."""
'''


def _token_text(value) -> str | None:
    # tokenizer_config.json stores a special token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_json_object(file: Path) -> dict:
    """tokenizer_config.json or generation_config.json as a dict, or a CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: not a JSON object (the file holds a {type(value).__name__})")
    return value


def _read_tokenizer_json(file: Path) -> tokenizers.Tokenizer:
    # tokenizers raises a bare Exception ("EOF while parsing a value at line 1 column 0") that names no file.
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:
        raise CheckpointError(f"{file}: not a valid tokenizer.json ({_one_line(e)})") from None


def _config_template(config: dict, config_file: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the "default" one)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: use the default one
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise CheckpointError(f"{config_file}: chat_template is a list whose entries are not all "
                                  '{"name": ..., "template": ...}')
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{config_file}: chat_template must be a string, got {type(template).__name__}")
    return template


def _generation_eos_ids(gen_file: Path) -> list[int]:
    extra = _read_json_object(gen_file).get("eos_token_id")
    ids = [extra] if isinstance(extra, int) else (extra or [])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{gen_file}: eos_token_id must be a token id or a list of them, got {extra!r}")
    return ids


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON (transformers does the same).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, config: dict, eos_token_ids: list[int], pad_token_id: int,
                 chat_template: str | None, template_file: str | Path | None = None):
        """template_file: where chat_template came from, named when it fails (None: passed in code)."""
        self.tok = tok
        self.config = config  # tokenizer_config.json contents, written back by save_pretrained
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._where = f"{template_file}: " if template_file is not None and chat_template else ""
        try:
            self._template = compile_template(self.chat_template)
        except Exception as e:  # TemplateSyntaxError mostly; the source is the checkpoint's, so anything
            line = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
            raise CheckpointError(f"{self._where}chat template does not compile: {line}"
                                  f"{_one_line(getattr(e, 'message', None) or e)}") from None
        # Templates may refer to {{ eos_token }} etc.; unset ones stay undefined, as in transformers.
        self.special_tokens = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS
                               if _token_text(config.get(k)) is not None}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        return _lookup(self.tok, token, "tokenizer")

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'}: no such file")
        tok = _read_tokenizer_json(path / "tokenizer.json")
        config_file = path / "tokenizer_config.json"
        config = _read_json_object(config_file) if config_file.is_file() else {}
        for key in SPECIAL_TOKEN_KEYS:
            if not isinstance(_token_text(config.get(key)), (str, type(None))):
                raise CheckpointError(f"{config_file}: {key} must be a token string, got {config[key]!r}")
        # Newer checkpoints keep the template in its own file; it wins over tokenizer_config.json.
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{template_file}: not UTF-8 text ({_one_line(e)})") from None
        else:
            template, template_file = _config_template(config, config_file), config_file
        config.pop("chat_template", None)

        eos_ids = []
        if _token_text(config.get("eos_token")) is not None:
            eos_ids.append(_lookup(tok, _token_text(config["eos_token"]), config_file))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():  # chat models often stop on several ids (e.g. <|im_end|> and <|endoftext|>)
            for i in _generation_eos_ids(gen_file):
                if i not in eos_ids:
                    eos_ids.append(i)
        if not eos_ids:
            raise ValueError(f"{path}: no EOS token (no eos_token in tokenizer_config.json, "
                             "no eos_token_id in generation_config.json)")
        pad = _token_text(config.get("pad_token"))
        pad_id = _lookup(tok, pad, config_file) if pad is not None else eos_ids[0]
        return cls(tok, config, eos_ids, pad_id, template, template_file)

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, eos_token: str, pad_token: str | None = None,
                        chat_template: str | None = None) -> "Tokenizer":
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                  "eos_token": eos_token, "pad_token": pad_token}
        eos_id = _lookup(tok, eos_token, "eos_token")
        pad_id = _lookup(tok, pad_token, "pad_token") if pad_token is not None else eos_id
        return cls(tok, config, [eos_id], pad_id, chat_template)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        # transformers drops None-valued keys first (content=None from chat APIs) so templates see them as unset.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as e:  # the template is the checkpoint's code: whatever it raises is its failure
            # (the sandbox refusing an attribute, an undefined name, its own raise_exception, a TypeError)
            what = _one_line(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {_one_line(e)}"
            raise CheckpointError(f"{self._where}chat template failed to render: {what}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def save_pretrained(self, path) -> None:
        """tokenizer.json + tokenizer_config.json (with the chat template in use, so serving renders the same,
        and the class that makes AutoTokenizer tokenize as we do: exact_load_config)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        config = exact_load_config(dict(self.config, chat_template=self.chat_template), self.tok)
        if "auto_map" in config:
            (path / f"{EXACT_MODULE}.py").write_text(EXACT_MODULE_SOURCE)
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def splits_like_qwen2(tok: tokenizers.Tokenizer) -> bool:
    """Whether transformers' Qwen2Tokenizer, rebuilt from tok's vocabulary and merges, tokenizes as tok does:
    the same normalizer (NFC), pre-tokenizer (Qwen2's split, then byte-level), decoder and BPE options."""
    spec = json.loads(tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    split = len(steps) == 2 and steps[0] == {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                                             "behavior": "Isolated", "invert": False}
    byte_level = len(steps) == 2 and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space") \
        and steps[1].get("use_regex") is False
    plain_bpe = model.get("type") == "BPE" and not any(model.get(k) for k in QWEN2_BPE_OFF)
    return (spec.get("normalizer") == {"type": "NFC"} and split and byte_level and plain_bpe
            and (spec.get("decoder") or {}).get("type") == "ByteLevel")


def exact_load_config(config: dict, tok: tokenizers.Tokenizer) -> dict:
    """tokenizer_config.json for tok, such that transformers' AutoTokenizer tokenizes exactly as we do.

    A tokenizer Qwen2Tokenizer reproduces (a real Qwen one) keeps its own config. Any other is named
    PreTrainedTokenizerFast, which loads tokenizer.json unchanged, and, because transformers 5 ignores that
    name for qwen2 checkpoints, also given an auto_map entry: AutoTokenizer then takes the class from
    tokenizer_class (or, with trust_remote_code=True, from the EXACT_MODULE file written beside it)."""
    config = dict(config)
    if splits_like_qwen2(tok):
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        return config
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["auto_map"] = {**config.get("auto_map", {}), "AutoTokenizer": [None, f"{EXACT_MODULE}.ExactTokenizer"]}
    return config


def _lookup(tok: tokenizers.Tokenizer, token: str, where) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"{where}: special token {token!r} is not in tokenizer.json's vocabulary")
    return i
