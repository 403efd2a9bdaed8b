"""The correctness checks bench/gpu_check.sh runs on a CUDA machine (each prints PASS/FAIL lines).

    python bench/gpu_checks.py kernels    # compiled Triton kernels vs float64: log-probs, entropy, dh, dW; advantages
    python bench/gpu_checks.py sampler    # decode paths on CUDA: CUDA graph / compiled vs eager, syncs, SDPA kernel
    TRITON_INTERPRET=1 python bench/gpu_checks.py kernels --smoke   # tiny shapes on a CPU: checks this script
    python bench/gpu_checks.py sampler --smoke                      # decode='static' vs eager on a CPU

kernels: fp32 / bf16 / fp16 at Qwen's V = 151,936 (one and several chunks), a chunk of more than 2^31
logits (int64 offsets in both row kernels), rows without gradient skipped exactly, the torch backend on
the same device agreeing; group advantages over every kernel tile shape vs float64; registers and spills
of the row kernels as this GPU's driver loads them.
sampler: generate(decode="graph") gives decode="static"'s tokens (fp32 model, ragged prompts, groups, EOS,
top-p, top-k) and, greedy, decode="eager"'s; decode="compile" (inductor, captured) greedy likewise; the
masked decode step runs with the math SDPA kernel disabled; host syncs per step; decode speed.
Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

RESULTS = {"pass": 0, "fail": []}
QWEN_V = 151936


def report(name: str, ok: bool, msg: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {msg}", flush=True)
    if ok:
        RESULTS["pass"] += 1
    else:
        RESULTS["fail"].append(name)


def check(name: str):
    """Run fn() as one named check: an exception is that check's FAIL, and the next check still runs."""
    def deco(fn):
        def run(*args, **kw):
            t0 = time.time()
            try:
                fn(*args, **kw)
            except Exception as exc:
                report(name, False, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                traceback.print_exc(limit=6)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            print(f"      ({name}: {time.time() - t0:.1f}s)", flush=True)
        return run
    return deco


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (gradients have entries near zero, so not elementwise)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- kernels


def logprob_inputs(n, h, v, dtype, device, seed, zero_every=4):
    g = torch.Generator(device=device).manual_seed(seed)
    hid = torch.randn(n, h, device=device, generator=g).to(dtype)
    w = (2.0 / math.sqrt(h) * torch.randn(v, h, device=device, generator=g)).to(dtype)  # logits ~ N(0, 4)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[0], y[-1] = 0, v - 1  # both ends of the vocabulary
    go, ge = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    go[::zero_every], ge[::zero_every] = 0.0, 0.0  # these rows have no gradient at all: skipped in backward
    ge[2::8] = 0.0
    return hid, w, y, go, ge


def float64_reference(h, w, y, tau, g, ge, logits=None):
    """The naive path in float64 (grads by autograd unless `logits` is given: then forward only, on them)."""
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    x = hd @ wd.T if logits is None else logits.double()
    lp = (x / tau).log_softmax(-1)
    logp, ent = lp.gather(1, y[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)
    if logits is not None:
        return logp.detach(), ent.detach(), None, None
    ((logp * g.double()).sum() + (ent * ge.double()).sum()).backward()
    return logp.detach(), ent.detach(), hd.grad, wd.grad


def fused(h, w, y, tau, g, ge, backend="triton", **kw):
    from nano_gtalign.kernels.logprob import fused_logprobs

    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = fused_logprobs(hh, ww, y, tau, return_entropy=True, backend=backend, **kw)
    ((logp * g).sum() + (ent * ge).sum()).backward()
    return logp.detach(), ent.detach(), hh.grad, ww.grad


def own_logits(h, w, chunk):
    """h·Wᵀ rounded exactly as the kernel's per-chunk GEMMs round it."""
    return torch.cat([h[s:s + chunk] @ w.T for s in range(0, h.shape[0], chunk)])


def logprob_case(name, n, hdim, v, dtype, tau, kw, device):
    from nano_gtalign.kernels.logprob import default_chunk_rows

    @check(f"logprob/{name}")
    def run():
        h, w, y, g, ge = logprob_inputs(n, hdim, v, dtype, device, seed=n + v)
        lp, en, dh, dw = fused(h, w, y, tau, g, ge, **kw)
        errs = dict(zip(("logp", "entropy", "dh", "dW"), map(rel, (lp, en, dh, dw), float64_reference(h, w, y, tau, g, ge))))
        skipped_exact = bool((dh[(g == 0) & (ge == 0)] == 0).all())
        finite = all(bool(torch.isfinite(t).all()) for t in (lp, en, dh, dw))
        if dtype == torch.float32:
            ok, extra = all(e <= 1e-5 for e in errs.values()), ""
        else:  # exact maths after the input-dtype GEMM; vs float64 on the inputs within its rounding
            chunk = kw.get("chunk_rows") or default_chunk_rows(n, v, hdim, dtype, h.device)
            o_lp, o_en, _, _ = float64_reference(h, w, y, tau, g, ge, logits=own_logits(h, w, chunk))
            own = dict(logp=rel(lp, o_lp), entropy=rel(en, o_en))
            full_tol = dict(logp=5e-3, entropy=2e-2, dh=3e-2, dW=3e-2)
            ok = all(e <= 1e-5 for e in own.values()) and all(errs[k] <= full_tol[k] for k in errs)
            extra = " | on its own logits: " + " ".join(f"{k} {e:.1e}" for k, e in own.items())
        t = dict(zip(("logp", "entropy", "dh", "dW"), map(rel, (lp, en, dh, dw), fused(h, w, y, tau, g, ge, "torch", **kw))))
        low = dtype != torch.float32
        t_ok = t["logp"] <= 1e-5 and t["entropy"] <= 1e-5 and t["dh"] <= (3e-2 if low else 1e-5) and t["dW"] <= (3e-2 if low else 1e-5)
        report(f"logprob/{name}", ok and t_ok and skipped_exact and finite,
               f"N={n} H={hdim} V={v} {str(dtype)[6:]} tau={tau} {kw} | vs float64: "
               + " ".join(f"{k} {e:.1e}" for k, e in errs.items()) + extra
               + " | vs torch backend: " + " ".join(f"{k} {e:.1e}" for k, e in t.items())
               + f" | skipped rows exact={skipped_exact} finite={finite}")
    run()


def logprob_over_2_31(device, n, v):
    """One chunk of n x v bf16 logits with n*v > 2^31: element offsets past int32 in both row kernels."""
    @check("logprob/chunk_over_2^31_logits")
    def run():
        # 1 row in 64 without gradient: the backward's chunk of active rows is past 2^31 logits too
        h, w, y, g, ge = logprob_inputs(n, 64, v, torch.bfloat16, device, seed=11, zero_every=64)
        lp, en, dh, dw = fused(h, w, y, 1.0, g, ge, chunk_rows=n)
        tail = torch.arange(max(0, n - 256), n, device=device)  # rows whose logits start beyond element 2^31
        hs, ys, gs, ges = h[tail], y[tail], g[tail], ge[tail]
        o_lp, o_en, _, _ = float64_reference(hs, w, ys, 1.0, gs, ges, logits=hs @ w.T)
        r_dh = float64_reference(hs, w, ys, 1.0, gs, ges)[2]
        e = dict(logp=rel(lp[tail], o_lp), entropy=rel(en[tail], o_en), dh=rel(dh[tail], r_dh))
        t = dict(zip(("logp", "entropy", "dh", "dW"),
                     map(rel, (lp, en, dh, dw), fused(h, w, y, 1.0, g, ge, "torch", chunk_rows=2048))))
        ok = (e["logp"] <= 1e-5 and e["entropy"] <= 1e-5 and e["dh"] <= 3e-2 and t["logp"] <= 1e-5
              and t["entropy"] <= 1e-5 and t["dh"] <= 3e-2 and t["dW"] <= 3e-2 and bool(torch.isfinite(dw).all()))
        big_enough = n * v > 2**31 or device == "cpu"  # (the --smoke run on a CPU uses a small chunk)
        report("logprob/chunk_over_2^31_logits", ok and big_enough,
               f"N={n} V={v} N*V={n * v:.3e} in one chunk | last 256 rows vs float64: "
               + " ".join(f"{k} {x:.1e}" for k, x in e.items()) + " | all rows vs torch backend (2048-row chunks): "
               + " ".join(f"{k} {x:.1e}" for k, x in t.items()))
    run()


@check("logprob/registers_spills")
def row_kernel_resources():
    """The dispatcher's row-kernel variants compiled for this GPU, their registers and spills as loaded."""
    import triton
    from triton.compiler import ASTSource

    from nano_gtalign.kernels.logprob import DEFAULT_BLOCK_V, _rows_backward_kernel, _rows_forward_kernel, row_kernel_warps

    target = triton.runtime.driver.active.get_current_target()
    common = {"stride": "i32", "targets_ptr": "*i64", "V": "i32", "inv_temp": "fp32", "BLOCK_V": "constexpr",
              "WITH_ENTROPY": "constexpr"}
    lines, ok = [f"target {target.arch}"], True
    for fn, ptrs in ((_rows_forward_kernel, ("logp_ptr", "lse_ptr", "mean_z_ptr")),
                     (_rows_backward_kernel, ("lse_ptr", "mean_z_ptr", "g_ptr", "g_ent_ptr"))):
        for entropy in (False, True):
            sig = {"x_ptr": "*bf16", **{p: "*fp32" for p in ptrs}, **common}
            sig = {k: sig[k] for k in fn.arg_names}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_V": DEFAULT_BLOCK_V,
                                                                           "WITH_ENTROPY": entropy}),
                               target=target, options={"num_warps": row_kernel_warps(DEFAULT_BLOCK_V)})
            k._init_handles()
            lines.append(f"{fn.__name__}[entropy={entropy}] regs={k.n_regs} spills={k.n_spills}")
            ok &= k.n_spills == 0
    report("logprob/registers_spills", ok, "; ".join(lines))


@check("advantage/every_tile_vs_float64")
def advantage_check(device, smoke):
    from nano_gtalign.kernels.advantage import MAX_TRITON_GROUP, group_advantages, token_advantages

    bad, worst = [], 0.0
    sizes = (2, 5, 17) if smoke else (2, 5, 8, 16, 17, 64, 300, 2048, MAX_TRITON_GROUP, MAX_TRITON_GROUP + 1)
    for G in sizes:
        n_groups = 3 if G > 1000 else (70 if smoke else 5000)
        for std, unbiased in ((True, True), (True, False), (False, True)):
            r = torch.rand(n_groups * G, device=device, generator=torch.Generator(device=device).manual_seed(G)) * 4 - 1
            r.view(n_groups, G)[::3] = 0.1  # constant groups: exactly 0
            got = group_advantages(r, G, std_normalize=std, unbiased=unbiased, backend="triton")
            d = r.double().view(n_groups, G)
            d = d - d.mean(1, keepdim=True)
            if std:
                d = d / ((d * d).sum(1, keepdim=True) / (G - 1 if unbiased else G)).sqrt().add(1e-6)
            d[::3] = 0.0
            err = ((got.double() - d.reshape(-1)).abs() - 1e-5 * d.reshape(-1).abs()).max().item()
            worst = max(worst, (got.double() - d.reshape(-1)).abs().max().item())
            if not (got.device == r.device and err <= 1e-5 and bool((got.view(n_groups, G)[::3] == 0).all())):
                bad.append(f"G={G} std={std} unbiased={unbiased} err={err:.1e}")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], device=device)
    per_token = token_advantages(torch.tensor([1.0, -2.0], device=device), mask).tolist()
    ok = not bad and per_token == [[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]
    report("advantage/every_tile_vs_float64", ok, f"group sizes {sizes} x 3 modes: max |error| {worst:.1e} "
           f"(allclose rtol = atol = 1e-5; constant groups exactly 0); token_advantages ok; failing: {bad[:5]}")


def kernels(smoke: bool) -> None:
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        report("kernels/setup", False, "no CUDA device, and TRITON_INTERPRET=1 is not set")
        return
    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    cases = [("fp32_small_chunks", 70, 48, 5003, f32, 0.7, dict(chunk_rows=32, block_v=1024)),
             ("bf16_small_block16", 40, 32, 3001, bf, 1.0, dict(chunk_rows=16, block_v=16))]
    if not smoke:
        cases += [("fp32_qwenV", 256, 128, QWEN_V, f32, 1.0, {}),
                  ("bf16_qwenV_H896", 1024, 896, QWEN_V, bf, 0.7, {}),
                  ("bf16_qwenV_3chunks", 1200, 256, QWEN_V, bf, 1.0, dict(chunk_rows=512)),
                  ("fp16_qwenV", 256, 128, QWEN_V, f16, 0.7, {}),
                  ("bf16_qwenV_block4096", 128, 64, QWEN_V, bf, 1.0, dict(block_v=4096)),
                  ("bf16_V17", 33, 64, 17, bf, 0.5, {})]
    for case in cases:
        logprob_case(*case, device=device)
    logprob_over_2_31(device, *((64, 1000) if smoke else (16384, QWEN_V)))
    if device == "cuda":
        row_kernel_resources()
    advantage_check(device, smoke)


# ----------------------------------------------------------------------------- sampler


class NumberTokenizer:
    """What generate needs from a tokenizer when the weights are random."""
    eos_token_ids = [2]
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False) -> str:
        return " ".join(map(str, ids))


def small_model(device, layers=4, vocab=4096):
    from nano_gtalign.model import Transformer
    from nano_gtalign.model_config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)
    with torch.device(device):
        model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init: confident, varied next-token distributions
        for p in model.parameters():
            p.mul_(3.0)
    return model


def ragged_prompts(n, longest, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (longest - 5 * i,), generator=g).tolist() for i in range(n)]


def same_generation(a, b) -> tuple[bool, str]:
    same = (torch.equal(a.completion_ids.cpu(), b.completion_ids.cpu()) and a.finish_reasons == b.finish_reasons
            and torch.equal(a.completion_mask.cpu(), b.completion_mask.cpu()))
    err = (a.logprobs - b.logprobs).abs().max().item()
    return same, f"tokens {'identical' if same else 'DIFFER'}, max |logprob diff| {err:.1e}"


SAMPLER_SETTINGS = (("greedy", dict(temperature=0.0, eos_token_ids=())),
                    ("top-p 0.9 + EOS", dict(temperature=1.0, top_p=0.9, seed=1, eos_token_ids=(2, 5, 7))),
                    ("top-k 50", dict(temperature=0.8, top_k=50, seed=2, eos_token_ids=())))


def decode_paths_agree(mode: str, device: str) -> None:
    """decode=mode against decode="static" (the same step run eagerly: identical tokens in every setting, since
    a CUDA graph replays the very kernels) and greedy against decode="eager" (the other attention layout: equal
    up to float noise, which can move a sampled token across a top-p boundary, so greedy only). Inductor's
    fused kernels ("compile") round differently from eager ones: greedy tokens only for it."""
    from nano_gtalign.sampling import SamplingParams, generate

    @check(f"sampler/{mode}")
    def run():
        model, tok = small_model(device), NumberTokenizer()
        prompts = ragged_prompts(4, 40, model.config.vocab_size)
        msgs, ok = [], True
        settings = SAMPLER_SETTINGS if mode in ("graph", "static") else SAMPLER_SETTINGS[:1]
        for label, fields in settings:
            params = SamplingParams(max_new_tokens=48, **fields)
            ours = generate(model, tok, prompts, params, num_samples=4, decode=mode)
            refs = ["static", "eager"] if label == "greedy" else ["static"]
            for ref in refs if mode != "static" else ["eager"]:
                pack = False if ref == "eager" else None  # oneDNN packing (CPU smoke run) rounds differently
                same, msg = same_generation(generate(model, tok, prompts, params, num_samples=4, decode=ref,
                                                     pack_weights=pack), ours)
                ok &= same
                msgs.append(f"{label} vs {ref}: {msg}")
        report(f"sampler/{mode}", ok, "fp32, 4 ragged prompts x 4 samples, 48 tokens | " + "; ".join(msgs))
    run()


@check("sampler/masked_decode_without_math_sdpa")
def no_math_attention(device):
    """The static step with ragged prompts runs with SDPA's math kernel disabled (flash/efficient/cuDNN only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nano_gtalign.sampling import SamplingParams, generate

    model, tok = small_model(device).to(torch.bfloat16), NumberTokenizer()
    prompts = ragged_prompts(4, 40, model.config.vocab_size)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, eos_token_ids=())
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    fused += [SDPBackend.CUDNN_ATTENTION] if hasattr(SDPBackend, "CUDNN_ATTENTION") else []
    with sdpa_kernel(fused):
        out = generate(model, tok, prompts, params, num_samples=2, decode="static")
    report("sampler/masked_decode_without_math_sdpa", bool(out.completion_mask.all()),
           "bf16 decode steps over a left-padded cache ran with only the fused SDPA kernels allowed")


@check("sampler/host_syncs")
def host_syncs(device):
    """Synchronising calls in a CUDA-graph generate: the every-CHECK_EVERY stop checks and the end, not per step."""
    from nano_gtalign.sampling import CHECK_EVERY, SamplingParams, generate

    model, tok = small_model(device).to(torch.bfloat16), NumberTokenizer()
    prompts = ragged_prompts(4, 40, model.config.vocab_size)
    params = SamplingParams(max_new_tokens=64, temperature=1.0, seed=0, eos_token_ids=(1,))
    generate(model, tok, prompts, SamplingParams(max_new_tokens=4, eos_token_ids=()), num_samples=2)  # warm-up
    counts = {}
    for mode in ("eager", "graph"):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                generate(model, tok, prompts, params, num_samples=2, decode=mode)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts[mode] = sum("synchroniz" in str(w.message) for w in caught)
    limit = 64 // CHECK_EVERY + 16  # the stop checks, plus the prefill's copies, the capture and the final copies
    report("sampler/host_syncs", counts["graph"] <= limit and counts["graph"] < counts["eager"],
           f"64-step generate with EOS ids: {counts['graph']} synchronising calls with decode='graph' "
           f"(limit {limit}), {counts['eager']} with decode='eager'")


@check("sampler/speed")
def decode_speed(device):
    """tokens/s of the decode paths at the Qwen2.5-0.5B shape (bf16, 8 ragged prompts x 8 samples): for reading."""
    from nano_gtalign.model import Transformer
    from nano_gtalign.model_config import ModelConfig
    from nano_gtalign.sampling import SamplingParams, generate

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=QWEN_V, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         rope_theta=1e6, max_position_embeddings=4096)
    with torch.device(device):
        model = Transformer(config).to(torch.bfloat16).eval()
    tok, prompts = NumberTokenizer(), ragged_prompts(8, 128, QWEN_V)
    params = SamplingParams(max_new_tokens=128, temperature=1.0, seed=0, eos_token_ids=())
    rates = {}
    for mode in ("eager", "graph"):
        generate(model, tok, prompts, SamplingParams(max_new_tokens=8, eos_token_ids=()), num_samples=8, decode=mode)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, tok, prompts, params, num_samples=8, decode=mode)
        torch.cuda.synchronize()
        rates[mode] = int(out.completion_mask.sum()) / (time.perf_counter() - t0)
    report("sampler/speed", True, f"64 rows, 128 new tokens: eager {rates['eager']:.0f} tok/s, "
           f"graph {rates['graph']:.0f} tok/s ({rates['graph'] / rates['eager']:.2f}x)")


def sampler(smoke: bool) -> None:
    if smoke:  # the script's logic on a CPU: the static step eagerly, no CUDA graph
        decode_paths_agree("static", "cpu")
        return
    if not torch.cuda.is_available():
        report("sampler/setup", False, "no CUDA device")
        return
    for mode in ("graph", "compile"):
        decode_paths_agree(mode, "cuda")
    no_math_attention("cuda")
    host_syncs("cuda")
    decode_speed("cuda")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("kernels", "sampler"))
    p.add_argument("--smoke", action="store_true",
                   help="check this script on a CPU: kernels in tiny shapes (TRITON_INTERPRET=1), sampler decode='static'")
    a = p.parse_args()
    print(f"INFO {a.what}: torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", flush=True)
    kernels(a.smoke) if a.what == "kernels" else sampler(a.smoke)
    print(f"SUMMARY {a.what}: {RESULTS['pass']} passed, {len(RESULTS['fail'])} failed {RESULTS['fail']}")
    return 1 if RESULTS["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
