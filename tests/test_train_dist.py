"""train.py under `torchrun --nproc_per_node=2` on CPU (gloo): DDP and FSDP2 runs end with identical
parameters on both ranks, agree with each other, and an FSDP2 run resumes exactly.

Always on the CPU, GPUs hidden, so that a one-GPU machine does not put rank 1 on a cuda:1 it lacks,
and the fp32 tolerances below hold (a GPU run would compute in bf16 and reduce with NCCL).

This file is also the torchrun worker: `python -m torch.distributed.run ... tests/test_train_dist.py OUT sgd|adamw ARGS...`
runs train.main with the stand-in reward of tests/test_train.py and writes each rank's full parameters to
OUT/rank{R}.pt. Each rank samples different prompts, so ranks that did not average their gradients would
end up with different weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(out: str, optimizer: str, args: list[str]) -> None:
    import torch.distributed as dist

    import train
    from nano_gtalign import evaluate, rollout
    from nano_gtalign.distributed import unwrap
    from tests.test_train import fake_score_batch

    dist.init_process_group("gloo")  # train.main sees an initialised group and leaves it to us
    rollout.score_batch = evaluate.score_batch = fake_score_batch
    if optimizer == "sgd":  # linear in the gradient, so DDP and FSDP2 can be compared closely (Adam's first
        # step is about sign(g), which float noise flips where g is ~0)
        torch.optim.AdamW = lambda params, lr, betas, weight_decay: torch.optim.SGD(params, lr=lr, momentum=0.9)
    res = train.main(args)
    state = unwrap(res.policy).state_dict()
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}
    torch.save(full, Path(out) / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


def torchrun(out: Path, args: list[str], optimizer: str = "sgd") -> dict[int, dict[str, torch.Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__)), str(out), optimizer, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.test_train import make_records
    from tests.tiny import make_hf_model
    root = tmp_path_factory.mktemp("dist")
    return make_hf_model(root / "model"), make_records(root / "train.jsonl", 16), root


def run_args(setup, out: Path, *extra: str) -> list[str]:
    model, data, _ = setup
    return ["--model", str(model), "--data", str(data), "--holdout", "2", "--out-dir", str(out), "--device", "cpu",
            "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "6", "--micro-batch-size", "2",
            "--lr", "1e-2", "--eval-every", "-1", "--save-every", "0", "--steps", "2", *extra]


def same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_ddp_and_fsdp2_ranks_agree(setup, tmp_path):
    model, _, _ = setup
    # With the KL term: the frozen reference runs replicated under DDP and sharded under FSDP2.
    ddp = torchrun(tmp_path / "ddp", run_args(setup, tmp_path / "ddp", "--kl-coef", "0.5"))
    same(ddp[0], ddp[1])
    from nano_gtalign.loader import load_pretrained
    init = {f"model.{k}": v for k, v in load_pretrained(model).state_dict().items()}
    assert any(not torch.equal(init[k], ddp[0][k]) for k in init), "the DDP run did not train"
    lines = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2  # rank 0 alone logs, one line per step
    assert lines[0]["kl"] == 0 and lines[1]["kl"] > 0  # the policy moved away from the reference after step 1

    fsdp = torchrun(tmp_path / "fsdp", run_args(setup, tmp_path / "fsdp", "--fsdp", "--kl-coef", "0.5"))
    same(fsdp[0], fsdp[1])
    # Same prompts, same per-rank sampling streams, same maths: only the reduction order differs.
    same(ddp[0], fsdp[0], atol=1e-5)


@pytest.mark.slow
def test_fsdp2_resume_is_exact(setup, tmp_path):
    # AdamW here: its sharded moments go through the full-state-dict save and load.
    full = torchrun(tmp_path / "full", run_args(setup, tmp_path / "full", "--fsdp"), "adamw")
    torchrun(tmp_path / "split", run_args(setup, tmp_path / "split", "--fsdp", "--halt-after", "1"), "adamw")
    resumed = torchrun(tmp_path / "split", run_args(setup, tmp_path / "split", "--fsdp", "--resume"), "adamw")
    same(full[0], resumed[0], atol=1e-6)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip finalizing, as train.py does under torchrun: gloo threads can abort it
