"""What a config.json means to our model: the fields it reads, each checked (type, range, divisibility), and the
Hugging Face config written back.

`ModelConfig.from_hf` reads a Qwen2 / Qwen3 / Llama config.json and refuses, with a ValueError naming the field
and the value, anything the model would compute differently and every value it could not compute with;
`ModelConfig.to_hf` writes the config.json that transformers and vLLM load. Llama 3.1 / 3.2's llama3 RoPE
scaling is read into `Llama3RopeScaling` (model.py's `rope_inv_freq` applies it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
# The largest size config.json may give: several times the largest published dense models (hidden 16384, 126
# layers, 256k vocabulary, 10M positions). A bigger number is a corrupt file, and building it would hang (a
# Python loop over 10**9 layers) or ask for terabytes, so from_hf refuses it before anything is built.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
               "max_position_embeddings": 2**24, "original_max_position_embeddings": 2**24}


@dataclass(frozen=True)
class Llama3RopeScaling:
    """rope_scaling {"rope_type": "llama3", ...} (Llama 3.1 / 3.2): how `rope_inv_freq` stretches RoPE's
    long wavelengths so that positions beyond the pretraining context stay in the range the model saw."""

    factor: float  # long wavelengths are stretched this many times
    low_freq_factor: float  # wavelengths above original / low_freq_factor are stretched fully ...
    high_freq_factor: float  # ... those below original / high_freq_factor not at all, those between in part
    original_max_position_embeddings: int  # the pretraining context length


@dataclass
class ModelConfig:
    """The fields of a Qwen2 / Qwen3 / Llama config.json that this model computes with (see from_hf / to_hf)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # hidden_size // heads unless the config gives it
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2: q/k/v bias; Qwen3: False; Llama: config.json's attention_bias
    qk_norm: bool = False  # Qwen3: True
    model_type: str = "qwen2"  # "qwen2" | "qwen3" | "llama"
    o_proj_bias: bool = False  # Llama with attention_bias=true (Qwen2's bias stops at q/k/v)
    mlp_bias: bool = False  # Llama's mlp_bias: gate/up/down projections
    rope_scaling: Llama3RopeScaling | None = None  # None: plain RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse anything this model would compute differently, and
        every value it could not compute with (wrong type, out of range, heads not a multiple of kv heads),
        with a ValueError naming the field and the value."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {_show(model_type)} (supported: qwen2, qwen3, llama)")
        archs = d.get("architectures") or [ARCHITECTURES[model_type]]
        if archs != [ARCHITECTURES[model_type]]:
            raise ValueError(f"unsupported architectures {_show(archs)} (expected [{ARCHITECTURES[model_type]!r}])")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {_show(d['hidden_act'])} (only 'silu')")
        # rope: newer configs nest it in rope_parameters, older ones use top-level rope_theta (+ rope_scaling).
        for key in ("rope_parameters", "rope_scaling"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(f"{key}={_show(d[key])}: must be a JSON object or null")
        # transformers (before and after v5) reads rope_scaling first when a config has both.
        rope_key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        rope = d.get(rope_key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {_show(rope_type)} in {rope_key} (only 'default' and 'llama3')")
        rope_theta = _positive("rope_theta", rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):  # RoPE on part of each head: not implemented
            raise ValueError(f"unsupported partial_rotary_factor={_show(partial)} (only 1.0)")
        rope_scaling = _llama3_rope(rope, rope_key) if rope_type == "llama3" else None
        layer_types = d.get("layer_types") or []
        if not isinstance(layer_types, list):
            raise ValueError(f"layer_types={_show(layer_types)}: must be a list")
        if _flag(d, "use_sliding_window") or "sliding_attention" in layer_types:
            raise ValueError("unsupported use_sliding_window=true / layer_types with sliding_attention "
                             "(only full attention)")
        # Qwen2 has q/k/v biases whatever attention_bias says (as in transformers); Qwen3 has none; Llama's
        # attention_bias covers q/k/v and o_proj, and only Llama reads mlp_bias.
        if _flag(d, "attention_bias") and model_type == "qwen3":
            raise ValueError("unsupported attention_bias=true for qwen3")
        llama_bias = model_type == "llama" and _flag(d, "attention_bias")
        mlp_bias = model_type == "llama" and _flag(d, "mlp_bias")
        for key in ("torch_dtype", "dtype"):  # not read (the weights' own dtype is), but a wrong one is a bad file
            if d.get(key) not in (None, "auto") and not _names_float_dtype(d[key]):
                raise ValueError(f"{key}={_show(d[key])}: must name a float dtype, such as 'bfloat16' or 'float32'")

        vocab_size, hidden, heads = _size(d, "vocab_size"), _size(d, "hidden_size"), _size(d, "num_attention_heads")
        kv_heads = _size(d, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if d.get("head_dim") is None and hidden < heads:
            raise ValueError(f"hidden_size={hidden} is smaller than num_attention_heads={heads} (with no head_dim, "
                             "head_dim is hidden_size // num_attention_heads)")
        return cls(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=_size(d, "intermediate_size"),
            num_hidden_layers=_size(d, "num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=_size(d, "head_dim", hidden // heads),
            rms_norm_eps=_positive("rms_norm_eps", d.get("rms_norm_eps", 1e-6), below=1.0), rope_theta=rope_theta,
            max_position_embeddings=_size(d, "max_position_embeddings", 32768),
            tie_word_embeddings=_flag(d, "tie_word_embeddings"),
            attention_bias=model_type == "qwen2" or llama_bias, qk_norm=model_type == "qwen3", model_type=model_type,
            o_proj_bias=llama_bias, mlp_bias=mlp_bias, rope_scaling=rope_scaling,
            bos_token_id=_token_ids(d, "bos_token_id", vocab_size),
            eos_token_id=_token_ids(d, "eos_token_id", vocab_size, several=True),
            pad_token_id=_token_ids(d, "pad_token_id", vocab_size),
        )

    def to_hf(self) -> dict:
        """A config.json dict that transformers (old and new) and vLLM load as Qwen2/Qwen3/LlamaForCausalLM."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **asdict(self.rope_scaling)}
        d = {
            "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            # Both rope styles, so transformers before and after v5 read the same theta.
            "rope_theta": self.rope_theta, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:  # where transformers < 5 and older vLLM look for it
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if self.model_type == "llama":
            d["attention_bias"], d["mlp_bias"] = self.o_proj_bias, self.mlp_bias
        else:
            d["use_sliding_window"] = False
        if self.model_type == "qwen3":
            d["attention_bias"] = False
        return d



def _show(value) -> str:
    """A config value for an error message: its repr, cut short (a corrupt file can hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _llama3_rope(rope: dict, where: str) -> Llama3RopeScaling:
    """The llama3 fields of rope_scaling / rope_parameters (`where`), each required and in range."""
    low = _positive(f"{where}.low_freq_factor", rope.get("low_freq_factor"))
    high = _positive(f"{where}.high_freq_factor", rope.get("high_freq_factor"))
    if high <= low:  # the blend between them divides by high - low
        raise ValueError(f"{where}.high_freq_factor={_show(high)} must be above low_freq_factor={_show(low)}")
    return Llama3RopeScaling(factor=_positive(f"{where}.factor", rope.get("factor")), low_freq_factor=low,
                             high_freq_factor=high,
                             original_max_position_embeddings=_size(rope, "original_max_position_embeddings"))


def _size(d: dict, key: str, default: int | None = None) -> int:
    """config.json's `key`: a whole number from 1 to SIZE_LIMITS[key]. Absent or null gives `default`
    (checked the same way: it may be computed from other fields); None: the field is required."""
    value = d.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config field {key!r} is missing")
        value = default
    if isinstance(value, float) and value.is_integer():  # 64.0 is 64; 64.5 is refused below
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SIZE_LIMITS[key]:
        raise ValueError(f"{key}={_show(value)}: must be a whole number from 1 to {SIZE_LIMITS[key]}")
    return value


def _positive(key: str, value, below: float = math.inf) -> float:
    """A finite number above 0 (and below `below`): NaN, inf and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < below):
        bound = "" if below == math.inf else f" and below {below:g}"
        raise ValueError(f"{key}={_show(value)}: must be a finite number above 0{bound}")
    return float(value)


def _flag(d: dict, key: str, default: bool = False) -> bool:
    """true or false (null: `default`); a string such as "false" would otherwise count as true."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key}={_show(value)}: must be true or false")
    return value


def _token_ids(d: dict, key: str, vocab_size: int, several: bool = False):
    """A token id in [0, vocab_size), or null; with `several`, a list of them is allowed too."""
    value = d.get(key)
    ids = value if several and isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
                                     for i in ids):
        what = "a token id or a list of them" if several else "a token id or null"
        raise ValueError(f"{key}={_show(value)}: must be {what}, from 0 to {vocab_size - 1} (vocab_size)")
    return value


def _names_float_dtype(name) -> bool:
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        and getattr(torch, name).is_floating_point

