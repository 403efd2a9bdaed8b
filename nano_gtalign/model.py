"""The model and nothing else: the Qwen2 / Qwen2.5 / Qwen3 / Llama decoder-only transformer and
the static KV cache its forward pass writes into, plus `decode_step`, the fixed-shape one-token step the
sampler's GPU path captures in a CUDA graph (cache written at a tensor position, attention over the
whole cache under a mask). Its config (ModelConfig: config.json read, checked and written back) is in
model_config.py.

Module names follow the Hugging Face checkpoints (model.embed_tokens, model.layers.N.self_attn.q_proj,
model.norm, lm_head) so that a checkpoint's state dict maps onto this model one to one.
Qwen3 differs from Qwen2 only in: RMSNorm on each q/k head before RoPE, no q/k/v bias, explicit head_dim.
Llama differs from Qwen2 only in: no q/k/v bias by default (attention_bias=true gives q/k/v AND o_proj a bias,
mlp_bias=true the three MLP projections) and, for Llama 3.1 / 3.2, llama3 RoPE scaling (Llama3RopeScaling).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat
from torch.utils.checkpoint import checkpoint

from nano_gtalign.model_config import ModelConfig

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; GPU machines may run older torch.
SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


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
