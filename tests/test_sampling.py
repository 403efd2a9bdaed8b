"""The KV-cache sampler: parity with transformers' greedy generate, stop strings, EOS masking,
GRPO group expansion, seeding, and log-probs checked against hand numbers and a full forward."""
import math
import sys

import pytest
import torch

from nano_gtalign.loader import load_pretrained, load_tokenizer
from nano_gtalign.sampling import Generation, SamplingParams, generate, sample_tokens
from tiny import make_hf_model

PROMPTS = ["What is 37 + 48?", "Hello", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: a second intra-op thread only adds sync overhead, and hurts on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    path = make_hf_model(tmp_path_factory.mktemp(request.param), arch=request.param)
    return path, load_pretrained(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = make_hf_model(tmp_path_factory.mktemp("qwen2_sampling"), arch="qwen2", seed=1)
    return load_pretrained(path), load_tokenizer(path)


def encode_all(tokenizer, texts=PROMPTS):
    return [tokenizer.encode(t) for t in texts]


def greedy(model, tokenizer, prompts, n=32, pack_weights=None, **kw) -> Generation:
    return generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=n, temperature=0.0, eos_token_ids=(), **kw),
                    pack_weights=pack_weights)


def row(gen: Generation, r: int) -> list[int]:
    """Row r's generated tokens (mask applied)."""
    return gen.completion_ids[r][gen.completion_mask[r]].tolist()


# ---------------------------------------------------------------------------- parity with transformers


def test_greedy_matches_transformers_on_ragged_batch(checkpoint):
    transformers = pytest.importorskip("transformers")
    path, model, tok = checkpoint
    prompts = encode_all(tok)
    assert len({len(p) for p in prompts}) == 3, "the batch must be ragged to exercise left padding"
    gen = greedy(model, tok, prompts, n=32)
    assert gen.completion_ids.shape == (3, 32)
    assert gen.completion_mask.all() and gen.finish_reasons == ["length"] * 3

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    hf.generation_config.eos_token_id = None  # EOS disabled on both sides: compare all 32 tokens
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
        ref = out[0, len(p):].tolist()
        assert len(ref) == 32, "transformers stopped early; EOS was not disabled"
        assert gen.completion_ids[i].tolist() == ref, f"row {i} differs from transformers' greedy output"


def test_group_copies_of_greedy_equal_single_rows(checkpoint):
    # Greedy decoding is deterministic, so the G rows of a prompt must equal its G=1 row:
    # checks that the expanded cache carries each prompt's keys/values to the right rows.
    _, model, tok = checkpoint
    prompts = encode_all(tok)
    single = greedy(model, tok, prompts, n=12)
    grouped = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=0.0, eos_token_ids=()),
                       num_samples=3)
    assert grouped.completion_ids.shape == (9, 12)
    for r in range(9):
        assert grouped.prompt_ids[r] == prompts[r // 3]
        assert torch.equal(grouped.completion_ids[r], single.completion_ids[r // 3])
        torch.testing.assert_close(grouped.logprobs[r], single.logprobs[r // 3])


# ---------------------------------------------------------------------------- stopping


def test_stop_string_spanning_tokens_stops_after_completing_token(qwen2):
    model, tok = qwen2
    prompts = encode_all(tok, PROMPTS[:2])
    free = greedy(model, tok, prompts, n=32)
    a = row(free, 0)
    # Stop string: the text of tokens k-2..k of row 0 minus its first character, so it starts
    # inside one token and ends exactly at the end of token k. Pick the first k where that text
    # is new, spans >= 2 tokens and no earlier prefix of the completion contains it.
    chosen = None
    for k in range(3, 30):
        text = tok.decode(a[k - 2:k + 1])[1:]
        if (len(text) >= 2 and len(tok.decode(a[k:k + 1])) < len(text)
                and text not in tok.decode(a[:k]) and text.strip()):
            chosen = k, text
            break
    assert chosen is not None, "no usable stop string in the greedy output"
    k, stop = chosen
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=32, temperature=0.0, eos_token_ids=(),
                                                       stop_strings=("never-generated-xyz", stop)))
    assert row(gen, 0) == a[:k + 1]
    assert gen.finish_reasons[0] == "stop"
    assert gen.texts[0] == tok.decode(a[:k + 1]) and gen.texts[0].endswith(stop)
    assert not gen.completion_mask[0, k + 1:].any()
    assert (gen.logprobs[0, k + 1:] == 0).all()
    # Row 1 runs on independently and stops at its own first occurrence (if any).
    b = row(free, 1)
    hits = [i for i in range(len(b)) if stop in tok.decode(b[:i + 1])]
    assert row(gen, 1) == (b[:hits[0] + 1] if hits else b)
    assert gen.finish_reasons[1] == ("stop" if hits else "length")


def test_eos_is_inside_the_mask_and_nothing_after(qwen2):
    model, tok = qwen2
    prompts = encode_all(tok, PROMPTS[:2])
    free = greedy(model, tok, prompts, n=24)
    a = row(free, 0)
    # Declare as EOS a token greedy produces in row 0 at step k (its first occurrence).
    k = next(i for i in range(4, 24) if a[i] not in a[:i])
    eos = a[k]
    unused_eos = max(set(range(tok.vocab_size)) - set(a) - set(row(free, 1)))  # an EOS id never produced
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=24, temperature=0.0,
                                                       eos_token_ids=(unused_eos, eos)))
    assert gen.finish_reasons[0] == "eos"
    assert gen.completion_mask[0].tolist() == [True] * (k + 1) + [False] * (gen.completion_ids.shape[1] - k - 1)
    assert row(gen, 0) == a[:k + 1] and gen.completion_ids[0, k] == eos
    assert (gen.completion_ids[0, k + 1:] == tok.pad_token_id).all()
    assert (gen.logprobs[0, k + 1:] == 0).all() and (gen.logprobs[0, :k + 1] < 0).all()
    assert gen.texts[0] == tok.decode(a[:k])  # the EOS token's text is left out
    b = row(free, 1)
    end = b.index(eos) + 1 if eos in b else len(b)
    assert row(gen, 1) == b[:end]
    assert gen.finish_reasons[1] == ("eos" if eos in b else "length")


def test_all_rows_stopping_early_trims_the_output(qwen2):
    model, tok = qwen2
    prompts = encode_all(tok, PROMPTS[:1])
    a = row(greedy(model, tok, prompts, n=16), 0)
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=16, temperature=0.0, eos_token_ids=(a[2],)))
    k = a.index(a[2])
    assert gen.completion_ids.shape == (1, k + 1) and gen.completion_mask.all()


# ---------------------------------------------------------------------------- groups and seeds


def test_group_expansion_prefills_once_and_gives_independent_samples(qwen2, monkeypatch):
    model, tok = qwen2
    prompts = encode_all(tok, PROMPTS[:2])
    calls = []
    forward = model.forward

    def counting_forward(input_ids, **kw):
        calls.append(tuple(input_ids.shape))
        return forward(input_ids, **kw)

    monkeypatch.setattr(model, "forward", counting_forward)
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=16, temperature=1.0, eos_token_ids=(), seed=0),
                   num_samples=4)
    monkeypatch.undo()
    prefill = [s for s in calls if s[1] > 1]
    assert prefill == [(2, max(len(p) for p in prompts))], "each distinct prompt must be prefilled exactly once"
    assert all(s == (8, 1) for s in calls[1:]) and len(calls) == 16  # 1 prefill + 15 decode steps
    assert gen.completion_ids.shape == (8, 16)
    assert gen.prompt_ids == [prompts[0]] * 4 + [prompts[1]] * 4
    for i in range(2):
        group = {tuple(gen.completion_ids[i * 4 + g].tolist()) for g in range(4)}
        assert len(group) == 4, f"the 4 samples of prompt {i} are not all different"


def test_seeded_runs_repeat_and_different_seeds_differ(qwen2):
    model, tok = qwen2
    prompts = encode_all(tok, PROMPTS[:2])

    def run(seed=None, generator=None):
        params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, eos_token_ids=(), seed=seed)
        return generate(model, tok, prompts, params, num_samples=2, generator=generator)

    a, b, c = run(seed=123), run(seed=123), run(seed=124)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    d = run(generator=torch.Generator().manual_seed(123))  # an explicit generator is the same stream
    assert torch.equal(a.completion_ids, d.completion_ids)


def test_top_k_1_is_greedy(qwen2):
    model, tok = qwen2
    prompts = encode_all(tok)
    g = greedy(model, tok, prompts, n=16)
    s = generate(model, tok, prompts, SamplingParams(max_new_tokens=16, temperature=0.8, top_k=1,
                                                     eos_token_ids=(), seed=7))
    assert torch.equal(g.completion_ids, s.completion_ids)
    assert torch.equal(s.logprobs, torch.zeros_like(s.logprobs))  # one candidate: probability 1


# ---------------------------------------------------------------------------- oneDNN-packed weights (CPU)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
def test_packed_weights_give_the_plain_results_and_restore_the_model(checkpoint):
    from nano_gtalign.cpu_packing import onednn_packing_applies

    _, model, tok = checkpoint
    assert onednn_packing_applies(model)  # the default on CPU: every other test here runs packed
    prompts = encode_all(tok)
    packed, plain = (greedy(model, tok, prompts, n=24, pack_weights=p) for p in (True, False))
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, eos_token_ids=(), seed=5)
    a, b = (generate(model, tok, prompts, params, num_samples=2, pack_weights=p) for p in (True, False))
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules()), "a packed forward was left on a module"


@needs_onednn
def test_packing_follows_weights_changed_between_calls(tmp_path):
    path = make_hf_model(tmp_path / "m", arch="qwen2", seed=2)
    model, tok = load_pretrained(path), load_tokenizer(path)
    prompts = encode_all(tok, PROMPTS[:2])
    before = greedy(model, tok, prompts, n=12)
    with torch.no_grad():  # what an optimizer step does between two GRPO rollouts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after, plain = (greedy(model, tok, prompts, n=12, pack_weights=p) for p in (True, False))
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, plain.completion_ids)


@needs_onednn
def test_packed_bf16_matches_plain_bf16(tmp_path):
    from nano_gtalign.cpu_packing import onednn_packing_applies

    path = make_hf_model(tmp_path / "m", arch="qwen3", seed=3)
    model, tok = load_pretrained(path, dtype=torch.bfloat16), load_tokenizer(path)
    if not onednn_packing_applies(model):
        pytest.skip("this CPU has no native bf16 (oneDNN would emulate it), so bf16 weights are not packed")
    prompts = encode_all(tok)
    packed, plain = (greedy(model, tok, prompts, n=8, pack_weights=p) for p in (True, False))
    # bf16 sums in another order can flip a near-tie; the first steps must agree and log-probs stay close
    assert torch.equal(packed.completion_ids[:, :2], plain.completion_ids[:, :2])
    torch.testing.assert_close(packed.logprobs[:, :2], plain.logprobs[:, :2], atol=2e-2, rtol=2e-2)


def test_autocast_dtype_reads_the_active_region():
    from nano_gtalign.kernels.logprob import autocast_dtype  # the one definition; the sampler and cpu_packing import it

    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype("cuda") is None  # per device type
    assert autocast_dtype("meta") is None  # a device type autocast does not know


def test_under_autocast_no_packing_and_the_cache_takes_the_compute_dtype(qwen2, monkeypatch):
    from nano_gtalign import model as model_module

    model, tok = qwen2
    dtypes = []
    init = model_module.KVCache.__init__

    def recording_init(self, *args, **kw):
        init(self, *args, **kw)
        dtypes.append(self.k[0].dtype)

    monkeypatch.setattr(model_module.KVCache, "__init__", recording_init)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear would compute in bf16, the packed op would not
        with pytest.raises(ValueError, match="pack_weights=True needs plain fp32 weights on a CPU"):
            greedy(model, tok, encode_all(tok), n=2, pack_weights=True)
        gen = greedy(model, tok, encode_all(tok), n=2)  # auto: falls back to F.linear under autocast
    assert gen.completion_mask.all()
    assert dtypes == [torch.bfloat16]  # fp32 weights, bf16 compute: the cache holds bf16
    greedy(model, tok, encode_all(tok), n=2)
    assert dtypes[-1] == torch.float32


# ---------------------------------------------------------------------------- log-probs


def reference_logprobs(model, prompt, completion, temperature, top_k=0):
    """log p(completion token) from one full forward pass of prompt+completion (no cache, no padding)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1] / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.3, 0), (0.9, 5)])
def test_logprobs_match_a_full_forward(qwen2, temperature, top_k):
    model, tok = qwen2
    prompts = encode_all(tok)
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k,
                                                       eos_token_ids=(), seed=3), num_samples=2)
    assert gen.logprobs.dtype == torch.float32
    for r in range(6):
        ref = reference_logprobs(model, gen.prompt_ids[r], row(gen, r), temperature, top_k)
        torch.testing.assert_close(gen.logprobs[r, :len(ref)], ref, atol=1e-4, rtol=1e-4)


def test_greedy_logprob_by_hand():
    # logits (0, ln 3): argmax is token 1 and p = 3 / (1 + 3) under the temperature-1 softmax.
    tokens, logp = sample_tokens(torch.tensor([[0.0, math.log(3.0)]]), temperature=0.0)
    assert tokens.tolist() == [1]
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_top_k_logprob_by_hand():
    # logits (1, 2, 3, 4), top-k 2: candidates are tokens 3 and 2 with p = e^4/(e^4+e^3) = 0.731059, 0.268941.
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    tokens, logp = sample_tokens(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {2, 3}
    assert logp[tokens == 3].unique().tolist() == pytest.approx([math.log(0.731059)], abs=1e-5)
    assert logp[tokens == 2].unique().tolist() == pytest.approx([math.log(0.268941)], abs=1e-5)
    assert (tokens == 3).float().mean().item() == pytest.approx(0.731, abs=0.04)


def test_top_p_logprob_by_hand():
    # p = (0.5, 0.3, 0.15, 0.05), top-p 0.7: mass before token 1 is 0.5 < 0.7 (kept), before token 2
    # it is 0.8 >= 0.7 (dropped). Renormalised: 0.5/0.8 = 0.625 and 0.3/0.8 = 0.375.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    tokens, logp = sample_tokens(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    assert logp[tokens == 0].unique().tolist() == pytest.approx([math.log(0.625)], abs=1e-5)
    assert logp[tokens == 1].unique().tolist() == pytest.approx([math.log(0.375)], abs=1e-5)
    assert (tokens == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)


def test_top_p_on_unsorted_logits_keeps_every_tie_at_the_boundary():
    # p = (0.2, 0.1, 0.3, 0.2, 0.2), top-p 0.55. Descending: 0.3 (mass before 0), 0.2 (0.3), 0.2 (0.5),
    # 0.2 (0.7), 0.1 (0.9): three are kept and the last kept p is 0.2, so all three 0.2s stay (a sort's
    # tie order must not decide). Kept mass 0.9: 0.3/0.9 = 1/3, each 0.2 gives 2/9; token 1 never.
    logits = torch.tensor([[0.2, 0.1, 0.3, 0.2, 0.2]]).log().repeat(9000, 1)
    tokens, logp = sample_tokens(logits, temperature=1.0, top_p=0.55, generator=torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 2, 3, 4}
    want = {0: 2 / 9, 2: 1 / 3, 3: 2 / 9, 4: 2 / 9}
    for t, p in want.items():
        assert logp[tokens == t].unique().tolist() == pytest.approx([math.log(p)], abs=1e-5)
        assert (tokens == t).float().mean().item() == pytest.approx(p, abs=0.02)


def test_temperature_logprob_by_hand():
    # logits (0, ln 3) at temperature 0.5 become (0, 2 ln 3): p = (1/10, 9/10).
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(500, 1)
    tokens, logp = sample_tokens(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert logp[tokens == 1].unique().tolist() == pytest.approx([math.log(0.9)], abs=1e-5)
    assert logp[tokens == 0].unique().tolist() == pytest.approx([math.log(0.1)], abs=1e-5)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(qwen2):
    model, tok = qwen2
    p = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, [], p)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tok, [[5], []], p)
    with pytest.raises(ValueError, match="encode text first"):
        generate(model, tok, ["hello"], p)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        generate(model, tok, [[5, 10**6]], p)
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, tok, [[5]], p, num_samples=0)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, tok, [[5] * (limit - 3)], SamplingParams(max_new_tokens=4))
    generate(model, tok, [[5] * (limit - 4)], SamplingParams(max_new_tokens=4, eos_token_ids=()))  # exactly fits
    for bad in [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_new_tokens=0), dict(stop_strings="</payoff>"), dict(stop_strings=("",))]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ---------------------------------------------------------------------------- decode paths (GPU path, checked on a CPU)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def assert_same_generation(a: Generation, b: Generation, atol: float = 1e-4):
    assert torch.equal(a.completion_ids.cpu(), b.completion_ids.cpu())
    assert torch.equal(a.completion_mask.cpu(), b.completion_mask.cpu())
    assert a.finish_reasons == b.finish_reasons and a.texts == b.texts
    torch.testing.assert_close(a.logprobs.cpu(), b.logprobs.cpu(), atol=atol, rtol=atol)


STATIC_CASES = {
    "greedy": dict(temperature=0.0, eos_token_ids=()),
    "top_p": dict(temperature=0.9, top_p=0.9, eos_token_ids=(), seed=11),
    "top_k_eos": dict(temperature=1.2, top_k=20, seed=12),
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_decode_step_gives_the_eager_tokens(checkpoint, case):
    # The GPU path's fixed-shape step (static cache written at a tensor position, attention over the whole
    # cache under a mask, kv heads folded into queries), run eagerly: ragged prompts, groups of 3.
    _, model, tok = checkpoint
    prompts = encode_all(tok)
    params = SamplingParams(max_new_tokens=20, **STATIC_CASES[case])
    eager = generate(model, tok, prompts, params, num_samples=3, decode="eager", pack_weights=False)
    static = generate(model, tok, prompts, params, num_samples=3, decode="static")
    assert_same_generation(eager, static)


def test_static_decode_stops_on_eos_and_stop_strings_like_eager(qwen2):
    model, tok = qwen2
    prompts = encode_all(tok, PROMPTS[:2])
    a = row(greedy(model, tok, prompts, n=24), 0)
    eos = next(t for i, t in enumerate(a) if i >= 3 and t not in a[:i])  # row 0 stops at step >= 3
    for params in (SamplingParams(max_new_tokens=24, temperature=0.0, eos_token_ids=(eos,)),
                   SamplingParams(max_new_tokens=24, temperature=0.0, eos_token_ids=(),
                                  stop_strings=(tok.decode(a[4:6]),))):
        eager = generate(model, tok, prompts, params, decode="eager")
        static = generate(model, tok, prompts, params, decode="static")
        assert_same_generation(eager, static)
        assert "length" not in eager.finish_reasons[:1]


def test_static_decode_asks_for_stopped_rows_every_k_steps(qwen2, monkeypatch):
    from nano_gtalign import sampling

    model, tok = qwen2
    calls = []
    none_running = sampling._Rows.none_running
    monkeypatch.setattr(sampling._Rows, "none_running", lambda self: calls.append(1) or none_running(self))
    params = SamplingParams(max_new_tokens=20, temperature=0.0, eos_token_ids=(1,))  # EOS on: checks happen
    generate(model, tok, encode_all(tok), params, decode="eager")
    assert len(calls) == 20  # every step (a host sync each)
    calls.clear()
    generate(model, tok, encode_all(tok), params, decode="static")
    assert len(calls) == 20 // sampling.CHECK_EVERY


def test_decode_mode_resolution_and_bad_values(qwen2, monkeypatch):
    from nano_gtalign.sampling import resolve_decode

    model, tok = qwen2
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("NANO_GTALIGN_DECODE", raising=False)
    assert resolve_decode("auto", cpu) == "eager" and resolve_decode("auto", cuda) == "graph"
    assert resolve_decode("static", cpu) == "static" and resolve_decode("compile", cpu) == "compile"
    monkeypatch.setenv("NANO_GTALIGN_DECODE", "static")
    assert resolve_decode("auto", cuda) == "static" and resolve_decode("eager", cuda) == "eager"
    monkeypatch.setenv("NANO_GTALIGN_DECODE", "fast")
    with pytest.raises(ValueError, match="NANO_GTALIGN_DECODE"):
        resolve_decode("auto", cpu)
    monkeypatch.delenv("NANO_GTALIGN_DECODE")
    with pytest.raises(ValueError, match="decode='graph' captures CUDA graphs"):
        resolve_decode("graph", cpu)
    with pytest.raises(ValueError, match="decode="):
        resolve_decode("jit", cpu)
    with pytest.raises(ValueError, match="pack_weights=True applies to decode='eager' only"):
        generate(model, tok, encode_all(tok), SamplingParams(max_new_tokens=2), pack_weights=True, decode="static")


def test_compiled_decode_step_has_no_graph_breaks_and_gives_the_eager_tokens(tmp_path, monkeypatch):
    # torch.compile(fullgraph=True) of the GPU path's step, on the CPU. The backend is aot_eager: dynamo
    # (which refuses any graph break under fullgraph) and AOTAutograd's functionalisation of the in-place
    # cache writes, without inductor's C++ build (a minute here). Inductor itself runs in bench/gpu_check.sh.
    from nano_gtalign import static_decode

    dynamo = pytest.importorskip("torch._dynamo", reason="this torch has no torch.compile")
    if not dynamo.is_dynamo_supported():
        pytest.skip(f"torch.compile is not supported on this platform (python {sys.version.split()[0]})")
    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(static_decode, "_COMPILED", {})
    dynamo.reset()
    dynamo.utils.counters.clear()
    path = make_hf_model(tmp_path / "m", arch="qwen3", seed=4)
    model, tok = load_pretrained(path), load_tokenizer(path)
    prompts = encode_all(tok)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, eos_token_ids=())
    compiled = generate(model, tok, prompts, params, num_samples=2, decode="compile")
    assert not dynamo.utils.counters["graph_break"], dict(dynamo.utils.counters["graph_break"])
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for all 11 steps: no recompiles
    eager = generate(model, tok, prompts, params, num_samples=2, decode="eager", pack_weights=False)
    assert_same_generation(eager, compiled)
    dynamo.reset()


@needs_cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_cuda_graph_decode_gives_the_static_and_eager_tokens(tmp_path, mode):
    # The CUDA path: the static step captured in a CUDA graph ("compile": inductor's step, captured). A replay
    # runs the very kernels of decode="static", so every setting gives its tokens; greedy also gives eager's
    # (another attention layout: float noise could move a sampled token across a top-p boundary, not argmax
    # on this model). Inductor rounds differently: greedy only for "compile".
    path = make_hf_model(tmp_path / "m", arch="qwen2", seed=5)
    model, tok = load_pretrained(path, device="cuda"), load_tokenizer(path)  # fp32
    prompts = encode_all(tok)
    settings = [dict(temperature=0.0, eos_token_ids=()), dict(temperature=1.0, top_p=0.9, seed=3)]
    for fields in settings if mode == "graph" else settings[:1]:
        params = SamplingParams(max_new_tokens=24, **fields)
        graph = generate(model, tok, prompts, params, num_samples=2, decode=mode)
        refs = ("static", "eager") if fields["temperature"] == 0.0 else ("static",)
        for ref in refs if mode == "graph" else ("eager",):
            assert_same_generation(generate(model, tok, prompts, params, num_samples=2, decode=ref), graph)


# ---------------------------------------------------------------------------- non-finite logits


NAN, INF = float("nan"), float("inf")
MODES = {"greedy": dict(temperature=0.0), "plain": dict(temperature=1.0), "low_temperature": dict(temperature=1e-3),
         "top_k": dict(temperature=1.0, top_k=5), "top_p": dict(temperature=1.0, top_p=0.9),
         "top_k_top_p": dict(temperature=0.7, top_k=50, top_p=0.5)}


def non_finite_rows(V: int) -> tuple[torch.Tensor, list[set[int] | None]]:
    """Rows of logits [R, V] with NaN / inf in them, and for each the tokens that may be drawn (None: any id)."""
    g = torch.Generator().manual_seed(0)
    rows, allowed = [], []

    def add(row, ok):
        rows.append(row)
        allowed.append(ok)
    add(torch.full((V,), NAN), None)                    # no distribution at all: any id in range
    add(torch.full((V,), -INF), None)
    add(torch.full((V,), INF), None)
    base = torch.randn(V, generator=g)
    row = base.clone(); row[::2] = NAN                  # NaN is never drawn
    add(row, set(range(1, V, 2)))
    row = base.clone(); row[7] = INF                    # +inf takes all the mass
    add(row, {7})
    row = base.clone(); row[[3, 9]] = INF; row[4] = NAN
    add(row, {3, 9})
    row = torch.full((V,), NAN); row[V - 1] = 0.0       # one usable token, the last one
    add(row, {V - 1})
    row = base.clone(); row[1] = -INF; row[2] = INF; row[0] = NAN
    add(row, {2})
    row = base * 1e38                                   # finite, but overflows once divided by a small temperature
    add(row, None)
    return torch.stack(rows), allowed


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_logits_never_give_an_id_outside_the_vocabulary(mode):
    # NaN logits made the cdf NaN, searchsorted then returned V ("index 300 is out of bounds"; on CUDA a
    # device-side assert), top-p gathered at -1 and top-k at k.
    V = 300
    logits, allowed = non_finite_rows(V)
    for seed in range(5):
        tokens, logprobs = sample_tokens(logits, generator=torch.Generator().manual_seed(seed), **MODES[mode])
        assert tokens.dtype == torch.long and tokens.shape == (len(allowed),)
        assert ((tokens >= 0) & (tokens < V)).all(), tokens
        for r, ok in enumerate(allowed):
            if ok is not None:  # NaN never drawn, +inf takes the mass; the log-prob is a log-prob, never NaN
                assert tokens[r].item() in ok and logprobs[r].item() <= 0.0, (r, tokens[r].item(), logprobs[r])


def test_finite_logits_give_the_same_tokens_and_logprobs_as_before():
    """The NaN guard leaves finite logits (-inf included) alone: draws pinned from the code before it (the
    tokens exactly; the log-probs to float32 rounding, which another CPU's vector width may change)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[0, :10] = -INF  # masked tokens stay masked
    for kw, (want_tokens, want_logprobs) in PINNED_DRAWS.items():
        tokens, logprobs = sample_tokens(logits, generator=torch.Generator().manual_seed(4), **dict(kw))
        assert tokens.tolist() == want_tokens, kw
        torch.testing.assert_close(logprobs, torch.tensor(want_logprobs), rtol=1e-6, atol=1e-7)


PINNED_DRAWS = {  # sample_tokens before the NaN guard, generator seed 4: (tokens, exact fp32 log-probs)
    (('temperature', 0.0),):
        ([30, 34, 30, 9, 20, 7], [-0.8652412295341492, -0.6530774831771851, -0.9346381425857544, -0.6541464328765869,
         -0.3902423679828644, -0.39364346861839294]),
    (('temperature', 1.0),):
        ([30, 34, 16, 45, 45, 7], [-0.8652412295341492, -0.6530774831771851, -1.5958101749420166, -3.9993746280670166,
         -3.365800619125366, -0.3936435282230377]),
    (('temperature', 0.05),):
        ([30, 34, 30, 9, 20, 7], [-2.2053334760130383e-05, -6.661338147750939e-16, -0.0014153579249978065,
         -2.0562713753946582e-09, 0.0, -4.567457523307894e-13]),
    (('temperature', 0.8), ('top_k', 7)):
        ([30, 19, 30, 41, 47, 7], [-0.7294542193412781, -2.5846669673919678, -0.7952033877372742, -3.1428468227386475,
         -3.864686965942383, -0.2013990730047226]),
    (('temperature', 1.2), ('top_p', 0.6)):
        ([30, 34, 25, 32, 20, 7], [-0.4934047758579254, -0.5030531883239746, -0.8391463756561279, -1.1944243907928467,
         -0.1750982105731964, -0.267021507024765]),
    (('temperature', 0.9), ('top_k', 20), ('top_p', 0.8)):
        ([30, 19, 30, 30, 7, 7], [-0.7046220302581787, -2.298091411590576, -0.7766728401184082, -1.8621723651885986,
         -2.309384346008301, -0.1875285804271698]),
}


def test_a_model_with_nan_weights_samples_ids_in_the_vocabulary(tmp_path):
    # load_pretrained refuses NaN weights; a model that diverges in memory (training) must still sample in range.
    path = make_hf_model(tmp_path / "m", arch="qwen2")
    model, tok = load_pretrained(path), load_tokenizer(path)
    with torch.no_grad():
        model.lm_head.weight[5:] = float("nan")
    prompts = encode_all(tok)
    for params in [SamplingParams(max_new_tokens=6, temperature=0.0, eos_token_ids=()),
                   SamplingParams(max_new_tokens=6, temperature=1.0, eos_token_ids=(), seed=0),
                   SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, eos_token_ids=(), seed=0),
                   SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20, eos_token_ids=(), seed=0)]:
        gen = generate(model, tok, prompts, params, num_samples=2)
        assert ((gen.completion_ids >= 0) & (gen.completion_ids < 5)).all(), gen.completion_ids
    with torch.no_grad():
        model.lm_head.weight[:] = float("nan")  # nothing usable at all: still in range, log-probs say NaN
    gen = generate(model, tok, prompts, SamplingParams(max_new_tokens=4, temperature=1.0, eos_token_ids=(), seed=0))
    assert ((gen.completion_ids >= 0) & (gen.completion_ids < model.config.vocab_size)).all()
    assert gen.logprobs.isnan().all()
