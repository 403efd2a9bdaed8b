"""The model and nothing else: the Qwen2 / Qwen2.5 / Qwen3 / Llama decoder-only transformer, its config and
the static KV cache its forward pass writes into, plus `decode_step`, the fixed-shape one-token step the
sampler's GPU path captures in a CUDA graph (cache written at a tensor position, attention over the
whole cache under a mask).

Module names follow the Hugging Face checkpoints (model.embed_tokens, model.layers.N.self_attn.q_proj,
model.norm, lm_head) so that a checkpoint's state dict maps onto this model one to one.
Qwen3 differs from Qwen2 only in: RMSNorm on each q/k head before RoPE, no q/k/v bias, explicit head_dim.
Llama differs from Qwen2 only in: no q/k/v bias by default (attention_bias=true gives q/k/v AND o_proj a bias,
mlp_bias=true the three MLP projections) and, for Llama 3.1 / 3.2, llama3 RoPE scaling (Llama3RopeScaling).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat
from torch.utils.checkpoint import checkpoint

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
# The largest size config.json may give: several times the largest published dense models (hidden 16384, 126
# layers, 256k vocabulary, 10M positions). A bigger number is a corrupt file, and building it would hang (a
# Python loop over 10**9 layers) or ask for terabytes, so from_hf refuses it before anything is built.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
               "max_position_embeddings": 2**24, "original_max_position_embeddings": 2**24}
# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; GPU machines may run older torch.
SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


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


class KVCache:
    """Static cache: per layer one preallocated [B, n_kv, max_seq_len, head_dim] tensor for keys and one for values."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.seq_len = 0  # positions filled so far (same for every row: rows are left-padded)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v at seq_len and return all keys/values so far (views, no copy)."""
        end = self.seq_len + k.shape[2]
        self.k[layer][:, :, self.seq_len:end] = k
        self.v[layer][:, :, self.seq_len:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_interleave(self, n: int) -> "KVCache":
        """Row i becomes rows i*n .. i*n+n-1 (GRPO: prefill each prompt once, then sample G times)."""
        out = KVCache.__new__(KVCache)
        out.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        out.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        out.seq_len = self.seq_len
        return out


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale in the input dtype (as the reference does: bf16 parity).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/head_dim), i < head_dim/2, in fp32 (llama3-scaled if configured)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: a frequency whose wavelength fits in the original context many times (original / wavelength above
    # high_freq_factor) is kept; one that fits fewer than low_freq_factor times is divided by `factor`; between
    # the two, a linear blend in original / wavelength, so that the stretch has no jump.
    wavelength = 2 * math.pi / inv_freq
    blend = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (s.high_freq_factor
                                                                                     - s.low_freq_factor)
    blend = blend.clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    # Qwen/HF convention: the two halves of head_dim form the (real, imaginary) pairs, not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (real, imaginary) pair of x [B, heads, T, hd] by its position's angle."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; writes its keys/values into the KV cache when given one."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, T, hd] and k, v [B, kv_heads, T, hd] of x [B, T, hidden], RoPE applied to q and k."""
        B, T, _ = x.shape
        # view/transpose, not einops, on this path: it runs per layer for every decoded token, where
        # einops' per-call overhead (~5 us x 4) slowed a small model's decode step by ~5-8%.
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:  # Qwen3: RMSNorm over each head's head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        rep = self.n_heads // self.n_kv
        causal = mask is None and T > 1
        if rep > 1 and kv_cache is not None and SDPA_HAS_GQA and (mask is None or x.device.type == "cpu"):
            # Decoding: let SDPA broadcast kv heads instead of copying the whole cache every step. On CUDA
            # only flash (no mask) and math accept enable_gqa, so a mask takes one of the branches below there.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        elif rep > 1 and T == 1 and kv_cache is not None:
            y = gqa_decode_attention(q, k, v, mask)  # masked decoding on a GPU: no copy, a fused kernel
        else:
            # Training/prefill: copy kv heads (enable_gqa blocks the fused masked kernels on GPU).
            # Query head h*rep + r reads kv head h, the order of HF's repeat_kv.
            if rep > 1:
                k, v = repeat(k, "b h s d -> b (h r) s d", r=rep), repeat(v, "b h s d -> b (h r) s d", r=rep)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # heads back side by side: [B, T, heads * hd]

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The fixed-shape decode step's attention (see `decode_step`): one new token per row, x [R, 1, hidden].

        Its keys/values are written into the static cache [R, kv_heads, S, hd] at `index` (a 1-element tensor,
        the same position for every row), and the query attends over the whole cache under the additive
        `mask` [R, 1, 1, S]: no shape depends on how many tokens were decoded, and nothing reads a host int.
        """
        q, k, v = self.project(x, cos, sin)
        k_cache.index_copy_(2, index, k.to(k_cache.dtype))
        v_cache.index_copy_(2, index, v.to(v_cache.dtype))
        y = gqa_decode_attention(q, k_cache, v_cache, mask)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], 1, -1))


def gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                         ) -> torch.Tensor:
    """SDPA for ONE query per row, q [B, heads, 1, hd], over grouped keys/values k, v [B, kv_heads, S, hd].

    The rep = heads / kv_heads query heads that share kv head h become rep queries of ONE head: q is viewed
    as [B, kv_heads, rep, hd] and SDPA runs as plain attention. That needs neither enable_gqa (which on CUDA
    sends a masked call to the math kernel, fp32 scores and all) nor a copy of the cache per kv head, and the
    [B, 1, 1, S] key mask broadcasts over the rep queries. Returns [B, heads, 1, hd].
    """
    B, H, _, D = q.shape
    y = F.scaled_dot_product_attention(q.view(B, k.shape[1], H // k.shape[1], D), k, v, attn_mask=mask)
    return y.reshape(B, H, 1, D)  # query head h*rep + r is row r of group h: the order of HF's repeat_kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer: x + attention(norm(x)), then + mlp(norm(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask: torch.Tensor | None, T: int, start: int, device) -> torch.Tensor | None:
    """One boolean SDPA mask [B|1, 1, T, S] (True = may attend): causal AND key is not padding.

    Query i sits at absolute position start+i. A padding query (left padding) would see no key at all and
    SDPA would return NaN, so every query may always attend to itself.
    """
    S = start + T
    if attention_mask is None and (start == 0 or T == 1):
        return None  # plain causal (SDPA's is_causal), or one new query that may see every key
    q_pos = torch.arange(start, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = k_pos <= q_pos  # [T, S]
    if attention_mask is None:
        return allowed
    if attention_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys but cache + input have {S}")
    allowed = allowed & (attention_mask[:, None, :].bool() | (k_pos == q_pos))  # [B, T, S]
    return allowed[:, None]


class Transformer(nn.Module):
    """The decoder-only language model: embeddings, `num_hidden_layers` Blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Not persistent: never in checkpoints; the loader recomputes it after building on the meta device.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        # HF-style init (std 0.02) so a model trained from scratch starts with small logits.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def init_buffers(self, device=None):
        """Recompute the RoPE buffer (after meta-device construction or on a new device)."""
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def output_weight(self) -> torch.Tensor:
        """The LM head's weight [V, H]: the embedding matrix when tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """fp32 logits [B, T, V] of input_ids [B, T] (the final-norm hidden states [B, T, H] with return_hidden).

        attention_mask [B, S] (1 = real token, left padding) covers the cached and the new positions; position
        ids then count real tokens only. With kv_cache the new keys/values are appended to it.
        """
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.seq_len
        if kv_cache is not None and start + T > kv_cache.max_seq_len:
            raise ValueError(f"KV cache full: {start} + {T} positions > max_seq_len {kv_cache.max_seq_len}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = attention_mask_4d(attention_mask, T, start, input_ids.device)

        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.dtype != torch.float32:  # model.to(bfloat16) casts buffers too; restore exact fp32 values
            self.init_buffers(self.inv_freq.device)
        cos, sin = self.rope(position_ids, x.dtype)

        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, layer in enumerate(self.model.layers):
            if use_ckpt:  # recompute activations in backward: memory O(layers * B*T*H) instead of all internals
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.seq_len += T
        h = self.model.norm(x)
        if return_hidden:
            return h
        return F.linear(h, self.output_weight()).float()

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, T, hd] of each position's RoPE angles (position_ids [B, T]), in `dtype`."""
        # fp32 angles: bf16 frequencies (0.4% error) would be off by tens of radians at position 1e4.
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def num_parameters(self) -> int:
        """Total parameter count (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


def decode_step(model: Transformer, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], tokens: torch.Tensor,
                positions: torch.Tensor, index: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """One decode step with fixed shapes and no host reads: what a CUDA graph or torch.compile can capture.

    tokens [R, 1] are fed at RoPE positions [R, 1] and their keys/values written at cache column `index`
    (a 1-element tensor) of the static caches (per layer [R, kv_heads, S, hd]). Each query attends to
    every column <= index that `key_valid` [R, S] marks real (left padding is not). Returns the final-norm
    hidden states [R, hidden]. The same maths as `Transformer.forward` with a KVCache, called on the
    submodules directly, so no module hook (FSDP2's, say) runs inside the captured step.
    """
    S = k_cache[0].shape[2]
    visible = key_valid & (torch.arange(S, device=tokens.device) <= index)
    # Additive mask in the attention dtype, built once per step rather than once per layer.
    mask = torch.zeros(visible.shape, dtype=k_cache[0].dtype, device=tokens.device)
    mask = mask.masked_fill(~visible, float("-inf"))[:, None, None, :]
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rope(positions, x.dtype)
    for i, layer in enumerate(model.model.layers):
        x = x + layer.self_attn.decode(layer.input_layernorm(x), cos, sin, mask, k_cache[i], v_cache[i], index)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)[:, 0]
