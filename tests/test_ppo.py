"""PPO (`train.py --algo ppo`, nano_gtalign/ppo.py): GAE, whitening, token rewards and the value loss against
hand-computed numbers; one PPO step's update against a naive per-row reference on a tiny model; train.py
with a value model end to end, exact resume with the critic, the flags; a 2-rank DDP run.

The end-to-end runs use the stand-in reward of tests/test_train.py (a random tiny model never writes the four
blocks, so the real reward would be 0 everywhere).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from nano_gtalign import evaluate, rollout
from nano_gtalign.distributed import Dist
from nano_gtalign.errors import UsageError
from nano_gtalign.loader import CheckpointError, load_pretrained
from nano_gtalign.model import Transformer
from nano_gtalign.model_config import ModelConfig
from nano_gtalign.policy import Policy
from nano_gtalign.ppo import (Critic, CriticTrainer, gae_advantages, make_critic, ppo_update,
                              token_rewards, value_loss, whiten)
from nano_gtalign.config import TrainConfig
from nano_gtalign.report import RolloutStats
from nano_gtalign.rollout import Rollout
from tests.test_train import argv, fake_score_batch, setup  # noqa: F401 (setup: a fixture)

NAN = float("nan")


def close(t: torch.Tensor, want: list) -> None:
    torch.testing.assert_close(t, torch.tensor(want, dtype=t.dtype), rtol=0, atol=1e-6)


@pytest.fixture(autouse=True)
def fake_reward(monkeypatch):
    monkeypatch.setattr(rollout, "score_batch", fake_score_batch)
    monkeypatch.setattr(evaluate, "score_batch", fake_score_batch)


# -----------------------------------------------------------------------------
# The tensor functions, by hand


def test_gae_gamma_lambda_one_is_reward_minus_value():
    # The reward on the last valid token; with gamma = lambda = 1 every A_t telescopes to R - V_t.
    # Values off the mask are never read (NaN there changes nothing).
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    v = torch.tensor([[0.5, 0.2, 0.1, NAN], [0.3, 0.4, NAN, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.8, 0.9, 0.0], [1.7, 1.6, 0.0, 0.0]])
    close(ret, [[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 0.0, 0.0]])


def test_gae_discounted_ragged_and_single_token():
    # gamma 0.9, lambda 0.8 (gamma*lambda = 0.72); rows of length 3, 1 (a single-token completion) and 0.
    # Row 0, V = [0.5, 0.2, 0.1], r = [0, 0, 1]:
    #   t=2: delta = 1 + 0.9*0 - 0.1 = 0.9                      A = 0.9
    #   t=1: delta = 0 + 0.9*0.1 - 0.2 = -0.11                  A = -0.11 + 0.72*0.9 = 0.538
    #   t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32                  A = -0.32 + 0.72*0.538 = 0.06736
    # Row 1, V = [0.25], r = [2]: the next value is past the end, so 0: A = 2 - 0.25 = 1.75.
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    r = token_rewards(torch.tensor([1.0, 2.0, NAN]), m)
    assert r.tolist() == [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # a failed (unmasked) row: no reward
    v = torch.tensor([[0.5, 0.2, 0.1], [0.25, 9.0, 9.0], [3.0, 3.0, 3.0]])
    adv, ret = gae_advantages(r, v, m, gamma=0.9, lam=0.8)
    close(adv, [[0.06736, 0.538, 0.9], [1.75, 0, 0], [0, 0, 0]])
    close(ret, [[0.56736, 0.738, 1.0], [2.0, 0, 0], [0, 0, 0]])
    # lambda 0: one-step TD errors; gamma 0: A = r - V
    adv, _ = gae_advantages(r, v, m, gamma=0.9, lam=0.0)
    assert adv[0].tolist() == pytest.approx([-0.32, -0.11, 0.9])
    adv, _ = gae_advantages(r, v, m, gamma=0.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([-0.5, -0.2, 0.9])


def test_token_rewards_refuse_an_unmasked_failed_row():
    with pytest.raises(ValueError, match="NaN reward"):
        token_rewards(torch.tensor([NAN]), torch.tensor([[True, False]]))


def test_whiten_over_the_valid_tokens():
    # valid: 1, 2, 3, 4 -> mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    s = math.sqrt(5 / 3 + 1e-8)
    close(whiten(x, m, Dist()), [[-1.5 / s, -0.5 / s, 0], [0.5 / s, 1.5 / s, 0]])
    one = whiten(torch.tensor([[3.0]]), torch.tensor([[True]]), Dist())
    assert one.tolist() == [[0.0]]  # a single token: centred, no division by a zero variance


def test_value_loss_by_hand():
    # clip 0.5; old value 0, return 1:
    #   V = 0.2: unclipped 0.64, clipped 0.64                    -> 0.32 (no clip)
    #   V = 0.8: V_clip = 0.5: unclipped 0.04 < clipped 0.25     -> 0.125 (clip active, no gradient)
    #   V = -1 : V_clip = -0.5: unclipped 4 > clipped 2.25       -> 2.0
    #   V = 3  : off the mask                                    -> 0
    v = torch.tensor([[0.2, 0.8, -1.0, 3.0]], requires_grad=True)
    old, ret = torch.zeros(1, 4), torch.ones(1, 4)
    m = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, st = value_loss(v, old, ret, m, clip=0.5)
    close(loss, [[0.32, 0.125, 2.0, 0.0]])
    assert float(st["clip_frac"]) == pytest.approx(1 / 3) and float(st["tokens"]) == 3
    loss.sum().backward()
    close(v.grad, [[-0.8, 0.0, -2.0, 0.0]])  # d/dV 0.5 (V - G)^2 = V - G
    loss, st = value_loss(v, old, ret, m, clip=0.0)  # off
    assert loss.tolist()[0][:3] == pytest.approx([0.32, 0.02, 2.0]) and float(st["clip_frac"]) == 0


# -----------------------------------------------------------------------------
# One PPO step against a naive reference


def tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=64)).float()


def naive_row(policy: Policy, critic: Critic, prompt: list[int], completion: list[int]):
    """log-probs and values of one unpadded row, straight from the logits and the hidden states."""
    ids = torch.tensor([prompt + completion])
    P = len(prompt)
    logp = policy.model(ids)[0].log_softmax(-1)
    lp = torch.stack([logp[P - 1 + j, tok] for j, tok in enumerate(completion)])
    hidden = critic.model(ids, return_hidden=True)[0]
    return lp, torch.stack([critic.head(hidden[P - 1 + j])[0] for j in range(len(completion))])


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    adv, running = [0.0] * len(values), 0.0
    for t in reversed(range(len(values))):
        nxt = values[t + 1] if t + 1 < len(values) else 0.0
        running = rewards[t] + gamma * nxt - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def naive_policy_loss(lp, old, adv):
    ratio = torch.exp(lp - old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    return torch.where(adv < 0, torch.minimum(loss, -adv * 3.0), loss)


LR = 0.02


def test_ppo_step_matches_a_naive_reference():
    # Rows of 4, 1 (single token), 3 (judge failed: out of everything) and 2 completion tokens; two epochs of
    # two mini-batches of two rows (four optimizer steps per model), micro-batches of one row; old log-probs =
    # the sampler's, perturbed so that the ratio clip and the dual clip bind; a small value clip so that the
    # second epoch's moved values are clipped. Plain SGD (lr 0.02): each update is linear in the gradient.
    policy, critic = Policy(tiny_model(0), torch.float32, "torch"), Critic(tiny_model(1))
    torch.nn.init.normal_(critic.head.weight, std=0.2)  # a nonzero head: the trunk gets gradient too
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    completions = [[15, 16, 17, 18], [19], [20, 21, 22], [23, 24]]
    welfare = [0.8, 0.1, NAN, 0.5]
    R, T = 4, 5
    ids, attn = torch.zeros(R, T, dtype=torch.long), torch.zeros(R, T, dtype=torch.bool)
    for i, c in enumerate(completions):
        ids[i, :len(c)], attn[i, :len(c)] = torch.tensor(c), True
    loss_mask = attn.clone()
    loss_mask[2] = False
    torch.manual_seed(2)
    old = torch.zeros(R, T)
    with torch.no_grad():
        for i in range(R):
            lp, _ = naive_row(policy, critic, prompts[i], completions[i])
            old[i, :len(lp)] = lp + 0.8 * torch.randn(len(lp))
    rewards = torch.tensor(welfare, dtype=torch.float32)
    ro = Rollout(prompts, ids, attn, loss_mask, old, rewards, rewards, torch.zeros(R),
                 [SimpleNamespace(welfare=w, data_source="arith_demo") for w in welfare], RolloutStats())
    # 2 prompts x G 2 = the 4 rows, 2 mini-batches of 1 prompt each
    cfg = TrainConfig(prompts_per_step=2, group_size=2, mini_batch_size=1, epochs=2, micro_batch_size=1,
                      old_logp="sampler", grad_clip=0.0, max_new_tokens=8, gamma=0.9, lam=0.8, value_clip=0.02)
    ref_policy, ref_critic = copy.deepcopy(policy), copy.deepcopy(critic)

    def sgd(module):
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LR)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    totals = ppo_update(policy, None, *sgd(policy), CriticTrainer(critic, *sgd(critic)), ro, cfg, step=1,
                        pad_id=0, d=Dist())
    assert totals.clip > 0 and totals.value_clip > 0  # both clips were exercised
    assert totals.opt_steps == 4 and totals.critic_opt_steps == 4

    # The reference: values before any update, GAE per row, whitening over the valid tokens of rows 0, 1, 3.
    kept = [0, 1, 3]
    with torch.no_grad():
        values = {i: naive_row(ref_policy, ref_critic, prompts[i], completions[i])[1].tolist() for i in kept}
    adv = {i: naive_gae([0.0] * (len(values[i]) - 1) + [welfare[i]], values[i], 0.9, 0.8) for i in kept}
    ret = {i: [a + v for a, v in zip(adv[i], values[i])] for i in kept}
    flat = torch.tensor([a for i in kept for a in adv[i]], dtype=torch.float64)
    white = {i: ((torch.tensor(adv[i], dtype=torch.float64) - flat.mean()) / (flat.var() + 1e-8).sqrt()).float()
             for i in kept}
    for rows in ([0, 1], [3]) * 2:  # row 2 failed: the second mini-batch trains on row 3 alone
        n_tok = sum(len(completions[i]) for i in rows)
        ref_policy.zero_grad()
        ref_critic.zero_grad()
        for i in rows:
            lp, v = naive_row(ref_policy, ref_critic, prompts[i], completions[i])
            v_old, g = torch.tensor(values[i]), torch.tensor(ret[i])
            v_clip = v_old + (v - v_old).clamp(-0.02, 0.02)
            (0.5 * torch.maximum((v - g) ** 2, (v_clip - g) ** 2)).sum().div(n_tok).backward()
            naive_policy_loss(lp, old[i, :len(lp)], white[i]).sum().div(n_tok).backward()
        with torch.no_grad():
            for p in [*ref_policy.parameters(), *ref_critic.parameters()]:
                if p.grad is not None:
                    p -= LR * p.grad
    for name, module, reference in (("policy", policy, ref_policy), ("critic", critic, ref_critic)):
        for (k, a), b in zip(module.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=lambda m: f"{name} {k}: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(critic.parameters(), Critic(tiny_model(1)).parameters()))


# -----------------------------------------------------------------------------
# train.py --algo ppo


TIMES = ("time", "step_time", "prompts_per_s", "tokens_per_s", "gen_tokens_per_s", "update_tokens_per_s",
         "gen_time", "score_time", "update_time", "eta_s")


def train_lines(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k not in TIMES} for ln in lines if ln["kind"] == "train"]


def critic_params(out: Path) -> dict[str, torch.Tensor]:
    policy = load_pretrained(out / "final")
    return make_critic(policy, str(out / "final_critic"), torch.device("cpu")).state_dict()


def test_ppo_trains_logs_and_exports_a_value_model(setup, tmp_path, capsys):
    res = train.main(argv(setup, tmp_path, "--algo", "ppo", "--steps", "2", "--critic-lr", "1e-2",
                          "--critic-warmup", "1"))
    printed = capsys.readouterr().out
    assert "| vf " in printed and " ev " in printed and " vclip " in printed
    lines = train_lines(tmp_path)
    for ln in lines:
        for key in ("value_loss", "explained_var", "value_mean", "value_clip_frac", "critic_grad_norm"):
            assert key in ln, key
        assert ln["critic_opt_steps"] == 1 and ln["critic_grad_norm"] > 0 and ln["value_loss"] > 0
        assert ln["clip_frac"] == 0.0 and ln["value_clip_frac"] == 0.0  # on-policy: nothing to clip
    assert lines[0]["opt_steps"] == 0 and lines[0]["grad_norm"] == 0  # --critic-warmup 1: the critic alone
    assert lines[1]["opt_steps"] == 1 and lines[1]["grad_norm"] > 0
    assert lines[0]["value_mean"] == 0.0 and lines[1]["value_mean"] != 0.0  # the zero-initialised head, trained
    # the exported value model loads back (--critic-model) with the trained weights, head included
    saved = critic_params(tmp_path)
    trained = res.critic.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert trained["head.weight"].abs().sum() > 0


def test_ppo_resume_continues_exactly(setup, tmp_path):
    # Two optimizer steps per rollout for both models (old log-probs recomputed), warm-up + cosine: the
    # critic's weights, AdamW moments and schedule must all be in the checkpoint for step 2 to match.
    common = ("--algo", "ppo", "--steps", "2", "--mini-batch-size", "1", "--lr-schedule", "cosine",
              "--warmup-steps", "1", "--critic-lr", "1e-2")
    train.main(argv(setup, tmp_path / "full", *common))
    halted = train.main(argv(setup, tmp_path / "split", *common, "--halt-after", "1"))
    assert halted.final_dir is None
    with pytest.raises(UsageError, match="--algo was 'ppo' in the checkpoint, 'grpo' now"):
        train.main(argv(setup, tmp_path / "split", *common[2:], "--resume"))
    train.main(argv(setup, tmp_path / "split", *common, "--resume"))
    full, split = train_lines(tmp_path / "full"), train_lines(tmp_path / "split")
    assert [m["step"] for m in split] == [1, 2] and split == full  # bit for bit
    assert full[1]["opt_steps"] == 2 and full[1]["critic_opt_steps"] == 2 and full[1]["value_clip_frac"] > 0
    for a, b in ((load_pretrained(tmp_path / "full" / "final").state_dict(),
                  load_pretrained(tmp_path / "split" / "final").state_dict()),
                 (critic_params(tmp_path / "full"), critic_params(tmp_path / "split"))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_flags(setup, tmp_path):
    root, model, data, _ = setup
    ppo = train.parse_args(["--model", "m", "--data", "d.jsonl", "--algo", "ppo"])
    assert ppo.group_size == 1 and ppo.critic_lr == 2e-6 and ppo.value_clip == 0.5 and ppo.kl_coef == 0
    assert (ppo.gamma, ppo.lam, ppo.critic_warmup, ppo.lr) == (1.0, 1.0, 0, 1e-6)
    assert train.parse_args(["--model", "m", "--data", "d.jsonl"]).group_size == 8
    assert train.parse_args(["--model", "m", "--data", "d", "--algo", "ppo", "--group-size", "4"]).group_size == 4
    demo = train.parse_args(["--algo", "ppo"])
    assert demo.group_size == 1 and demo.lr == train.DEMO_DEFAULTS["lr"]
    assert {k: getattr(demo, k) for k in train.DEMO_PPO_DEFAULTS} == train.DEMO_PPO_DEFAULTS
    with pytest.raises(UsageError, match="--drop-zero-spread"):
        train.parse_args(["--algo", "ppo", "--drop-zero-spread"])
    with pytest.raises(UsageError, match="--critic-model needs --algo ppo"):
        train.parse_args(["--critic-model", str(model)])
    with pytest.raises(UsageError, match="--gamma"):
        train.parse_args(["--algo", "ppo", "--gamma", "1.5"])


# -----------------------------------------------------------------------------
# 2 ranks (gloo): this file is also the torchrun worker, as tests/test_train_dist.py is


def worker(out: str, args: list[str]) -> None:
    """train.main with the stand-in reward and SGD (linear in the gradient, so DDP and FSDP2 compare closely);
    writes each rank's full policy and critic parameters to OUT/{policy,critic}{rank}.pt."""
    import torch.distributed as dist

    from nano_gtalign.distributed import unwrap
    dist.init_process_group("gloo")
    rollout.score_batch = evaluate.score_batch = fake_score_batch
    torch.optim.AdamW = lambda params, lr, betas, weight_decay: torch.optim.SGD(params, lr=lr, momentum=0.9)
    res = train.main(args)
    for name, module in (("policy", res.policy), ("critic", res.critic)):
        state = unwrap(module).state_dict()
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}
        torch.save(full, Path(out) / f"{name}{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ppo_on_two_ranks_ddp_and_fsdp2_agree(setup, tmp_path):
    import os
    import subprocess
    import sys
    root, model, data, _ = setup
    runs = {}
    for name in ("ddp", "fsdp"):
        out = tmp_path / name
        out.mkdir()
        args = ["--model", str(model), "--data", str(data), "--holdout", "2", "--out-dir", str(out), "--algo", "ppo",
                "--prompts-per-step", "4", "--max-new-tokens", "6", "--micro-batch-size", "1", "--lr", "1e-2",
                "--critic-lr", "1e-2", "--eval-every", "-1", "--save-every", "0", "--steps", "2"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(out), *args, *(["--fsdp"] if name == "fsdp" else [])]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
        runs[name] = {f"{m}{r}": torch.load(out / f"{m}{r}.pt") for m in ("policy", "critic") for r in (0, 1)}
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    for m in ("policy", "critic"):
        for a, b, atol in ((ddp[f"{m}0"], ddp[f"{m}1"], 0), (fsdp[f"{m}0"], fsdp[f"{m}1"], 0),
                           (ddp[f"{m}0"], fsdp[f"{m}0"], 1e-5)):  # ranks identical; DDP and FSDP2 agree
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda msg: f"{m} {k}: {msg}")
    assert ddp["critic0"]["head.weight"].abs().sum() > 0  # the value head trained
    lines = {name: [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in runs}
    assert [ln["samples"] for ln in lines["ddp"]] == [4, 4] and all(ln["critic_opt_steps"] == 1 for ln in lines["ddp"])
    for a, b in zip(lines["ddp"], lines["fsdp"]):  # the clip sees the same gradient norms (FSDP2's are DTensors)
        assert a["critic_grad_norm"] == pytest.approx(b["critic_grad_norm"], rel=1e-5) and a["critic_grad_norm"] > 0
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-5)


if __name__ == "__main__":
    import os
    import sys
    worker(sys.argv[1], sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip finalizing, as train.py does under torchrun: gloo threads can abort it
