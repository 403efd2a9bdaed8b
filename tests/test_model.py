"""Our Qwen2/Qwen3/Llama transformer against hand-computed numbers and against transformers on tiny random models.

Run: python -m pytest tests/test_model.py -q
"""
import json
import math
import shutil

import pytest
import torch

from nano_gtalign.loader import load_pretrained, load_tokenizer
from nano_gtalign.model import (KVCache, RMSNorm, Transformer, apply_rope, attention_mask_4d, decode_step,
                                gqa_decode_attention, rope_inv_freq)
from nano_gtalign.model_config import Llama3RopeScaling, ModelConfig
from nano_gtalign.sampling import SamplingParams, generate
from tests.tiny import make_hf_model

transformers = pytest.importorskip("transformers")

# bf16: both implementations run the same bf16 ops, so logits agree to a couple of bf16 ulps at |logit| ~ 1.
TOL = {"float32": 1e-4, "bfloat16": 1e-2}
# Llama 3.1's rope_scaling with an original context of 16 positions (Llama 3.1: 8192), so that a 100-token test
# sequence reaches far beyond it; rope_theta 5e5 as Llama 3 has, so some wavelengths exceed 16 and are stretched.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
LLAMA3 = dict(rope_scaling=LLAMA3_ROPE, rope_theta=5e5, max_position_embeddings=128)


def hf_model(path, dtype="float32"):
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(path, **{key: getattr(torch, dtype)}).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Builds (once per module) a tiny HF checkpoint for a given (arch, tied, dtype, sharded)."""
    made = {}

    def get(arch="qwen2", tied=False, dtype="float32", sharded=False, **overrides):
        key = (arch, tied, dtype, sharded, repr(sorted(overrides.items())))  # repr: overrides may hold dicts
        if key not in made:
            path = tmp_path_factory.mktemp(f"{arch}_{tied}_{dtype}_{sharded}")
            make_hf_model(path, arch, tie_word_embeddings=tied, dtype=dtype,
                          max_shard_size="60KB" if sharded else None, **overrides)
            made[key] = path
        return made[key]

    return get


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------- formulas against hand-computed numbers

def test_rmsnorm_hand_computed():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    # x = (3, 4): rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    out = norm(torch.tensor([[3.0, 4.0]]))
    r = math.sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[3.0 / r, 8.0 / r]]))


def test_rope_hand_computed():
    cfg = tiny_config(head_dim=4, rope_theta=100.0)
    inv = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1]))  # theta^(-0/4), theta^(-2/4)
    # Position p rotates the pair (x[0], x[2]) by p radians and (x[1], x[3]) by 0.1 p radians.
    p = 3.0
    ang = torch.tensor([p * 1.0, p * 0.1, p * 1.0, p * 0.1])
    x = torch.tensor([1.0, 2.0, 0.0, 0.0])
    out = apply_rope(x, ang.cos(), ang.sin())
    expected = torch.tensor([math.cos(3.0), 2 * math.cos(0.3), math.sin(3.0), 2 * math.sin(0.3)])
    torch.testing.assert_close(out, expected)


def test_attention_mask_hand_computed():
    # Row 0 is left-padded by one; cache already holds 1 position, 2 new queries (positions 1 and 2).
    am = torch.tensor([[0, 1, 1], [1, 1, 1]])
    m = attention_mask_4d(am, T=2, start=1, device="cpu")
    assert m.shape == (2, 1, 2, 3)
    assert m[0, 0].tolist() == [[False, True, False], [False, True, True]]
    assert m[1, 0].tolist() == [[True, True, False], [True, True, True]]
    # A pure padding query may only see itself (so SDPA never gets an all-masked row).
    m = attention_mask_4d(torch.tensor([[0, 0, 1]]), T=3, start=0, device="cpu")
    assert m[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert attention_mask_4d(None, T=4, start=0, device="cpu") is None


def test_llama3_rope_scaling_hand_computed():
    # head_dim 4, theta 100: wavelengths 2*pi (frequency 1) and 20*pi (frequency 0.1). With an original context
    # of 64, 64 / (2 pi) = 10.2 > high_freq_factor 4: kept; 64 / (20 pi) = 1.02 is just above low_freq_factor 1:
    # blended, almost fully divided by the factor. With 16: 16 / (2 pi) = 2.5 blends, 16 / (20 pi) < 1 divides.
    def inv(original):
        scaling = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=original)
        return rope_inv_freq(tiny_config(head_dim=4, rope_theta=100.0, rope_scaling=scaling)).tolist()

    def blended(f, original):
        b = (original * f / (2 * math.pi) - 1.0) / 3.0
        return (1 - b) * f / 8.0 + b * f

    assert inv(64) == pytest.approx([1.0, blended(0.1, 64)], rel=1e-6)
    assert inv(16) == pytest.approx([blended(1.0, 16), 0.1 / 8.0], rel=1e-6)
    assert rope_inv_freq(tiny_config(head_dim=4, rope_theta=100.0)).tolist() == pytest.approx([1.0, 0.1])


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_match_transformers(checkpoint, arch, tied, dtype):
    # One variant is saved in several shards so the index path is covered against real HF output.
    sharded = arch == "qwen3" and tied and dtype == "float32"
    path = checkpoint(arch, tied, dtype, sharded)
    if sharded:
        assert (path / "model.safetensors.index.json").exists()
    ours = load_pretrained(path)
    assert ours.output_weight().dtype == getattr(torch, dtype)
    ref = hf_model(path, dtype)
    ids = torch.randint(3, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids), ref(ids).logits.float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL[dtype]
    # return_hidden gives the final-normed states that the head maps to the logits
    with torch.no_grad():
        h = ours(ids, return_hidden=True)
        hf_h = ref(ids, output_hidden_states=True).hidden_states[-1]
    assert h.shape == (2, 11, 64)
    assert (h.float() - hf_h.float()).abs().max().item() <= TOL[dtype]
    torch.testing.assert_close((h @ ours.output_weight().T).float(), got)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_left_padded_batch_matches_unpadded_rows(checkpoint, arch):
    model = load_pretrained(checkpoint(arch))
    rows = [[5, 9, 17, 33, 4, 8, 21], [7, 3, 12], [40]]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        assert not batch.isnan().any()  # pure padding positions included
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))
            assert (batch[i, width - len(r):] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["llama3_rope", "biases_tied"])
def test_llama_variants_match_transformers(checkpoint, variant):
    # llama3 RoPE scaling over 100 positions, 6x its original context of 16; and attention_bias (q/k/v AND
    # o_proj) with mlp_bias and a tied head. GQA (4 heads over 2 kv heads) in both.
    overrides = LLAMA3 if variant == "llama3_rope" else dict(attention_bias=True, mlp_bias=True)
    path = checkpoint("llama", tied=variant == "biases_tied", **overrides)
    ours, ref = load_pretrained(path), hf_model(path)
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads
    if variant == "llama3_rope":
        assert ours.config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 16)
    else:
        assert ours.model.layers[0].self_attn.o_proj.bias is not None and ours.model.layers[0].mlp.up_proj.bias \
            is not None and ours.config.tie_word_embeddings
    ids = torch.randint(3, ours.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits.float()
        assert (ours(ids) - want).abs().max().item() <= TOL["float32"]
        if variant == "llama3_rope":  # the scaling must matter, or this test could not fail
            ours.config.rope_scaling = None
            ours.init_buffers()
            assert (ours(ids) - want).abs().max().item() > 1e-3


def test_llama3_rope_greedy_decode_matches_transformers(checkpoint):
    # Our KV-cache sampler against transformers' greedy generate, a ragged batch decoded from positions
    # 5 and 30 to 95 and 120: mostly beyond the original context of 16.
    path = checkpoint("llama", **LLAMA3)
    model, tok, hf = load_pretrained(path), load_tokenizer(path), hf_model(path)
    gen_ids = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=gen_ids).tolist() for n in (30, 5)]
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=90, temperature=0.0, eos_token_ids=()))
    hf.generation_config.eos_token_id = None  # EOS disabled on both sides: compare all 90 tokens
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=90, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert gen.completion_ids[i].tolist() == out[0, len(p):].tolist(), f"row {i} differs from transformers"


def left_padded_pair(seed: int, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random token ids and their attention mask; row 1 is left-padded by `pad` columns."""
    ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_kv_cache_decoding_matches_full_forward(checkpoint, arch):
    model = load_pretrained(checkpoint(arch))
    ids, mask = left_padded_pair(seed=1, length=12, pad=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, batch_size=2, max_seq_len=16, dtype=torch.float32)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], kv_cache=cache)]  # prefill
        steps.append(model(ids[:, 5:8], attention_mask=mask[:, :8], kv_cache=cache))  # chunk on top of a cache
        for t in range(8, 12):  # one token at a time
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    assert cache.seq_len == 12
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (inc - full)[real].abs().max().item() <= 1e-5
    # without an attention mask (no padding) positions come from the cache offset
    with torch.no_grad():
        full = model(ids[:1])
        cache = KVCache(model.config, 1, 12)
        inc = torch.cat([model(ids[:1, :6], kv_cache=cache)] +
                        [model(ids[:1, t:t + 1], kv_cache=cache) for t in range(6, 12)], dim=1)
    assert (inc - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_static_decode_step_matches_full_forward(checkpoint, arch):
    # decode_step (the GPU path: cache written at a tensor index, attention over all 16 columns under a mask)
    # after a prefill gives the full forward's logits, with a left-padded row.
    model = load_pretrained(checkpoint(arch))
    ids, mask = left_padded_pair(seed=2, length=11, pad=4)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, batch_size=2, max_seq_len=16)
        model(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)  # prefill: columns 0..5
        key_valid = torch.ones(2, 16, dtype=torch.bool)
        key_valid[:, :6] = mask[:, :6].bool()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        index = torch.tensor([6])
        for t in range(6, 11):
            h = decode_step(model, cache.k, cache.v, ids[:, t:t + 1], positions[:, t:t + 1], index, key_valid)
            logits = torch.nn.functional.linear(h, model.output_weight())
            assert (logits - full[:, t]).abs().max().item() <= 1e-5, t
            index += 1
    assert cache.seq_len == 6  # decode_step leaves the Python-side count alone: nothing host-side changes


def test_folded_gqa_decode_attention_equals_repeated_kv_heads():
    # One query per row; 6 query heads over 2 kv heads; a key mask with padding: the fold (rep queries of one
    # head) gives SDPA over each kv head repeated rep times (HF's repeat_kv order).
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask)
    torch.testing.assert_close(gqa_decode_attention(q, k, v, mask), want)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(gqa_decode_attention(q, k, v, additive), want)


def test_kv_cache_repeat_interleave_expands_rows(checkpoint):
    model = load_pretrained(checkpoint("qwen3"))
    prompts = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = (prompts != 0).long()
    nxt = torch.tensor([[31], [32], [33], [41], [42], [43]])  # a different next token per sample
    with torch.no_grad():
        cache = KVCache(model.config, 2, 8)
        model(prompts, attention_mask=mask, kv_cache=cache)
        big = cache.repeat_interleave(3)
        assert big.batch_size == 6 and big.seq_len == 5 and big.max_seq_len == 8
        mask6 = torch.cat([mask.repeat_interleave(3, dim=0), torch.ones(6, 1, dtype=torch.long)], dim=1)
        step = model(nxt, attention_mask=mask6, kv_cache=big)
        full = model(torch.cat([prompts.repeat_interleave(3, dim=0), nxt], dim=1), attention_mask=mask6)
    assert cache.seq_len == 5  # the original is untouched
    assert (step[:, 0] - full[:, -1]).abs().max().item() <= 1e-5


def test_kv_cache_overflow_and_bad_mask_are_clear_errors():
    model = Transformer(tiny_config())
    cache = KVCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="attention_mask covers 3 keys"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("style", ["rope_parameters", "top_level"])
def test_rope_theta_config_styles(checkpoint, style, tmp_path):
    src = checkpoint("qwen2", rope_theta=1e6)
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_theta", None)
    if style == "top_level":  # the classic (transformers < 5) layout
        cfg["rope_theta"] = 1e6
    else:  # the transformers >= 5 layout
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(tmp_path / "m")
    assert ours.config.rope_theta == 1e6
    ref = hf_model(src)
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        assert (ours(ids) - want).abs().max().item() <= 1e-4
        ours.config.rope_theta = 1e4  # theta must matter, or this test could not fail
        ours.init_buffers()
        assert (ours(ids) - want).abs().max().item() > 1e-3


def test_from_hf_reads_fields_and_round_trips():
    d = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "rope_theta": 5e5, "tie_word_embeddings": True, "eos_token_id": [2, 0]}
    c = ModelConfig.from_hf(d)
    assert (c.head_dim, c.qk_norm, c.attention_bias, c.rope_theta, c.eos_token_id) == (32, True, False, 5e5, [2, 0])
    assert ModelConfig.from_hf(c.to_hf()) == c
    q2 = ModelConfig.from_hf({**d, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "head_dim": None})
    assert (q2.head_dim, q2.qk_norm, q2.attention_bias) == (16, False, True)
    # Llama 3.2's layout: rope_scaling without rope_theta (top-level), attention/mlp biases off.
    llama = {**d, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "head_dim": None,
             "rope_scaling": dict(LLAMA3_ROPE, original_max_position_embeddings=8192), "attention_bias": False,
             "mlp_bias": False, "pretraining_tp": 1}
    c = ModelConfig.from_hf(llama)
    assert (c.head_dim, c.qk_norm, c.attention_bias, c.o_proj_bias, c.mlp_bias, c.rope_theta) == \
        (16, False, False, False, False, 5e5)
    assert c.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert ModelConfig.from_hf(c.to_hf()) == c
    assert c.to_hf()["rope_scaling"] == dict(LLAMA3_ROPE, original_max_position_embeddings=8192)
    assert c.to_hf()["rope_parameters"] == dict(LLAMA3_ROPE, original_max_position_embeddings=8192, rope_theta=5e5)
    biased = ModelConfig.from_hf({**llama, "attention_bias": True, "mlp_bias": True, "rope_scaling": None})
    assert (biased.attention_bias, biased.o_proj_bias, biased.mlp_bias, biased.rope_scaling) == (True, True, True, None)
    assert ModelConfig.from_hf(biased.to_hf()) == biased


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


@pytest.mark.parametrize("change, field", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type"),
    ({**LLAMA, "architectures": ["Qwen2ForCausalLM"]}, "architectures"),
    ({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    ({**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
    ({**LLAMA, "rope_scaling": {**LLAMA3_ROPE, "factor": None}}, "rope_scaling.factor"),
    ({**LLAMA, "rope_scaling": {**LLAMA3_ROPE, "factor": -8.0}}, "rope_scaling.factor"),
    ({**LLAMA, "rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 1.0}}, "high_freq_factor"),
    ({**LLAMA, "rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": "1"}}, "rope_parameters.low_freq_factor"),
    ({**LLAMA, "rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 0}},
     "original_max_position_embeddings"),
    ({**LLAMA, "rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": None}},
     "original_max_position_embeddings"),
    ({**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({**LLAMA, "mlp_bias": "yes"}, "mlp_bias"),
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_from_hf_refuses_unsupported(change, field):
    d = {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(d)


# ---------------------------------------------------------------- training

def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    import nano_gtalign.model as model_module

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    model = Transformer(tiny_config(qk_norm=True, attention_bias=False, model_type="qwen3")).train()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0

    def grads(ckpt: bool):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids, attention_mask=mask).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert calls == [False, False]  # one checkpointed call per layer, non-reentrant
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_rope_frequencies_stay_fp32_after_casting_the_model():
    model = Transformer(tiny_config(rope_theta=1e6)).to(torch.bfloat16)
    model(torch.zeros(1, 2, dtype=torch.long))
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, rope_inv_freq(model.config), rtol=0, atol=0)


def test_tied_head_is_the_embedding():
    model = Transformer(tiny_config(tie_word_embeddings=True))
    assert model.output_weight() is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()
    untied = Transformer(tiny_config())
    assert untied.output_weight() is untied.lm_head.weight


def test_grouped_query_attention_equals_multi_head_with_each_kv_head_repeated():
    # Query head h*rep + r reads kv head h (repeat_interleave layout, as HF's repeat_kv): a GQA model equals the
    # MHA model whose k/v projections repeat each kv head's rows rep times. Checked with and without the cache.
    torch.manual_seed(0)
    gqa = Transformer(tiny_config(num_attention_heads=6, num_key_value_heads=2))
    mha = Transformer(tiny_config(num_attention_heads=6, num_key_value_heads=6))
    state = gqa.state_dict()
    for name, t in list(state.items()):
        if ".k_proj." in name or ".v_proj." in name:
            state[name] = t.unflatten(0, (2, -1)).repeat_interleave(3, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids, attention_mask=mask), mha(ids, attention_mask=mask))
        caches = [KVCache(m.config, 2, 8) for m in (gqa, mha)]
        for m, c in zip((gqa, mha), caches):
            m(ids, attention_mask=mask, kv_cache=c)
        step = [m(ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), kv_cache=c)
                for m, c in zip((gqa, mha), caches)]
    torch.testing.assert_close(step[0], step[1])


def test_imports_point_one_way_scripts_to_library_to_kernels():
    # kernels never import the library; model.py (only the model) imports no other library module but
    # model_config.py (its config), and model_config.py imports nothing of ours.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    for path in sorted((root / "nano_gtalign" / "kernels").glob("*.py")):
        # absolute imports of ours, or relative ones that climb out of the kernels package
        ours = [n for n in imported(path) if n.startswith("nano_gtalign")]
        climbs = [node.level for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.ImportFrom) and node.level > 1]
        assert not ours and not climbs, f"{path.name} imports the library: {ours or climbs}"
    for name, allowed in (("model.py", {"nano_gtalign.model_config"}), ("model_config.py", set())):
        ours = {n for n in imported(root / "nano_gtalign" / name) if n.startswith("nano_gtalign")}
        assert ours <= allowed, f"{name} imports {sorted(ours - allowed)}"
        assert not any(node.level for node in ast.walk(ast.parse((root / "nano_gtalign" / name).read_text()))
                       if isinstance(node, ast.ImportFrom)), f"{name} has a relative import"
