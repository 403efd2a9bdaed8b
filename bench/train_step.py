"""GRPO step throughput: generation and update tokens/s and peak memory, fused log-prob kernel vs naive.

    python bench/train_step.py                  # CPU-sized model (the table in bench/RESULTS.md)
    python bench/train_step.py --gpu            # Qwen2.5-0.5B- and 1.5B-shaped, 64 prompts x 8 samples x 512 tokens
    python bench/train_step.py --preset 0.5b --prompts 8 --new-tokens 128     # one preset, smaller step

One step is train.py's: the sampler draws `--group-size` completions per prompt (EOS disabled, so every
completion is exactly --new-tokens long), then nano_gtalign.update.update runs the clipped GRPO loss over them (one
optimizer step, micro-batches of --micro-batch-size rows, AdamW). The update is timed with the fused
kernel (nano_gtalign/kernels/logprob.py; Triton on CUDA, its torch backend on CPU) and with the naive path that
materialises [tokens, vocab] fp32 logits. Weights are random (seeded); advantages are random normal, so
the gradients have the right shapes and sizes. Each configuration runs in its own process so that its peak
memory is its own: CUDA max_memory_allocated per phase, or on CPU the process's peak RSS.

Columns: gen tok/s = completion tokens / generation seconds; update tok/s = completion tokens / update
seconds (the second of two updates, so JIT compilation is not counted); peak = peak memory in GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
else:
    sys.path.insert(0, str(ROOT))

# name -> (ModelConfig fields, prompts, group size, prompt tokens, new tokens, micro-batch rows, dtype, grad ckpt)
PRESETS = {
    "cpu": (dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
            8, 4, 32, 64, 32, "float32", False),
    "0.5b": (dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                  rope_theta=1e6), 64, 8, 128, 512, 16, "bfloat16", True),
    "1.5b": (dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
                  rope_theta=1e6), 64, 8, 128, 512, 16, "bfloat16", True),
}


class NullTokenizer:
    """What the sampler needs from a tokenizer when the weights are random: no EOS, a pad id, and no text."""
    eos_token_ids: list[int] = []
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def peak_gib(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(preset: str, backend: str, prompts: int, group: int, prompt_len: int, new_tokens: int,
           micro: int, threads: int) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)

    from nano_gtalign.config import TrainConfig
    from nano_gtalign.distributed import Dist, generation_mode
    from nano_gtalign.model import Transformer
    from nano_gtalign.model_config import ModelConfig
    from nano_gtalign.policy import Policy
    from nano_gtalign.report import RolloutStats
    from nano_gtalign.rollout import Rollout
    from nano_gtalign.sampling import SamplingParams, generate
    from nano_gtalign.update import update

    fields, _, _, _, _, _, dtype_name, ckpt = PRESETS[preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    config = ModelConfig(**fields, max_position_embeddings=prompt_len + new_tokens + 8)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    kernel_backend = "naive" if backend == "naive" else "auto"
    # train.py's defaults for one on-policy optimizer step over the whole rollout
    cfg = TrainConfig(micro_batch_size=micro, max_new_tokens=new_tokens, grad_checkpointing=ckpt, dtype=dtype_name)
    d = Dist(device=device)
    policy = Policy(model, dtype, kernel_backend)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    g = torch.Generator(device=device).manual_seed(0)
    prompt_ids = torch.randint(3, config.vocab_size, (prompts, prompt_len), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, eos_token_ids=())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with generation_mode(policy, False):  # warm-up: kernels, allocator
        generate(policy, NullTokenizer(), prompt_ids[:2].tolist(), SamplingParams(max_new_tokens=2, eos_token_ids=()),
                 num_samples=2, generator=g)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    with generation_mode(policy, False):
        gen = generate(policy, NullTokenizer(), prompt_ids.tolist(), params, num_samples=group, generator=g)
    sync()
    gen_s = time.perf_counter() - t0
    gen_peak = peak_gib(device)
    tokens = int(gen.completion_mask.sum())

    rewards = torch.randn(len(gen.prompt_ids), generator=torch.Generator().manual_seed(1))
    ro = Rollout(gen.prompt_ids, gen.completion_ids.cpu(), gen.completion_mask.cpu(),
                 gen.completion_mask.cpu(), gen.logprobs.cpu(), rewards, rewards, rewards, [], RolloutStats())
    advantages = rewards[:, None].expand(ro.loss_mask.shape)
    del gen
    times = []
    for _ in range(2):  # the first includes compilation (Triton) and allocator growth
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        update(policy, None, optimizer, scheduler, ro, advantages, cfg, 0, d)
        sync()
        times.append(time.perf_counter() - t0)
    return dict(preset=preset, backend=backend, device=str(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                              else "cpu"),
                params_m=sum(p.numel() for p in model.parameters()) / 1e6, tokens=tokens,
                gen_tok_s=tokens / gen_s, update_tok_s=tokens / times[-1], update_s=times[-1],
                gen_peak_gib=gen_peak, update_peak_gib=peak_gib(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="run the 0.5b and 1.5b presets (needs CUDA)")
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--backends", default="fused,naive", help="comma-separated: fused, naive")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); on a shared 2-core CPU a second thread mostly waits")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    presets = [a.preset] if a.preset else (["0.5b", "1.5b"] if a.gpu else ["cpu"])

    def shape(name):
        _, prompts, group, plen, new, micro, _, _ = PRESETS[name]
        return (a.prompts or prompts, a.group_size or group, a.prompt_tokens or plen, a.new_tokens or new,
                a.micro_batch_size or micro)

    if a.worker:
        print(json.dumps(worker(a.preset, a.backends, *shape(a.preset), a.threads)))
        return
    print(f"config: presets={presets} backends={a.backends} threads={a.threads}", flush=True)
    rows = []
    for name in presets:
        prompts, group, plen, new, micro = shape(name)
        print(f"{name}: {prompts} prompts x {group} samples, {plen}-token prompts, {new}-token completions, "
              f"micro-batch {micro} rows", flush=True)
        for backend in a.backends.split(","):
            cmd = [sys.executable, __file__, "--worker", "--preset", name, "--backends", backend,
                   "--prompts", str(prompts), "--group-size", str(group), "--prompt-tokens", str(plen),
                   "--new-tokens", str(new), "--micro-batch-size", str(micro), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
            if out.returncode != 0:  # e.g. out of memory on the naive path: report it, keep going
                last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"  {backend}: failed: {last[:300]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"  {backend}: done ({r['update_s']:.1f}s update)", flush=True)
    if not rows:
        return
    print(f"\ndevice: {rows[0]['device']}")
    print(f"{'model':6s} {'params':>8s} {'logprob':>8s} {'tokens':>8s} {'gen tok/s':>10s} {'update tok/s':>13s} "
          f"{'gen peak':>9s} {'upd peak':>9s}")
    for r in rows:
        print(f"{r['preset']:6s} {r['params_m']:7.1f}M {r['backend']:>8s} {r['tokens']:8d} {r['gen_tok_s']:10.0f} "
              f"{r['update_tok_s']:13.0f} {r['gen_peak_gib']:8.2f}G {r['update_peak_gib']:8.2f}G")
    if rows[0]["device"] == "cpu":
        print("(CPU peak = the process's peak RSS, weights and generation included)")


if __name__ == "__main__":
    main()
