"""train.py end to end on a tiny random model (CPU): a short run, exact resume, refused bad checkpoints,
metrics.jsonl, and the library pieces of the step (data order, token layout, learning-rate schedule,
concatenated generations, repeatable evaluation) with hand-computed expectations.

The reward here is a stand-in (`fake_score_batch`): a random tiny model never writes the four blocks, so the
real reward would be 0 everywhere and no gradient would flow. The stand-in gives every completion a welfare
that depends on its text, and a failed judgement to some, so the whole update path is exercised; the real
reward is tested in tests/test_reward.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train
from nano_gtalign import evaluate, rollout
from nano_gtalign.data import Cursor, epoch_order, next_prompts, read_records
from nano_gtalign.distributed import Dist
from nano_gtalign.errors import UsageError
from nano_gtalign.http_judge import make_judge
from nano_gtalign.layout import pack_rows
from nano_gtalign.loader import CheckpointError, load_pretrained
from nano_gtalign.policy import Policy, compute_dtype
from nano_gtalign.config import TrainConfig
from nano_gtalign.rollout import concat_generations
from nano_gtalign.scoring import RewardBreakdown
from nano_gtalign.update import lr_factor
from tests.tiny import make_hf_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

QUESTIONS = [("What is 3 + 4?", "7"), ("Add 5 to my number.", "vague"), ("What is 9 - 2?", "7"),
             ("How much is 6 times 7?", "42"), ("Multiply my number by 3.", "vague"), ("What is 12 + 30?", "42"),
             ("What is 8 + 8?", "16"), ("Take 4 away from my number.", "vague")]


def make_records(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            q, gt = QUESTIONS[i % len(QUESTIONS)]
            rec = {"prompt": [{"role": "system", "content": "Reply in four blocks."},
                              {"role": "user", "content": f"{q} ({i})"}],
                   "data_source": "arith_demo", "reward_model": {"ground_truth": gt, "style": "rule"},
                   "extra_info": {"single_turn_prompt": q, "question_type": "VQ" if gt == "vague" else "DQ"}}
            f.write(json.dumps(rec) + "\n")
    return path


def fake_score_batch(completions, records, judge, **kwargs):
    """Welfare from the text (distinct characters / 20); texts of a length divisible by 7 fail to judge."""
    out = []
    for text, rec in zip(completions, records):
        failed = len(text) % 7 == 0
        w = float("nan") if failed else len(set(text)) / 20
        out.append(RewardBreakdown(
            format=0.0, payoff_spread=0.0, pareto_consistency=0.0, answer_user=w, answer_llm=w,
            response_band=0.0, reasoning_brevity=0.0, full_band=0.0, user=w, llm=w, welfare=w,
            action=None, question_type=None, strategy=("DA", "CQ", "AQ", None)[len(text) % 4],
            judge_failed=failed, parse_error=None, data_source=rec["data_source"]))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_hf_model(root / "model")
    data = make_records(root / "train.jsonl", 16)
    evals = make_records(root / "test.jsonl", 4)
    return root, model, data, evals


@pytest.fixture(autouse=True)
def fake_reward(monkeypatch):
    monkeypatch.setattr(rollout, "score_batch", fake_score_batch)
    monkeypatch.setattr(evaluate, "score_batch", fake_score_batch)


def argv(setup, out: Path, *extra: str) -> list[str]:
    root, model, data, evals = setup
    return ["--model", str(model), "--data", str(data), "--eval-data", str(evals), "--out-dir", str(out),
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--micro-batch-size", "3",
            "--lr", "1e-2", "--eval-every", "-1", "--save-every", "0", "--eval-size", "4", *extra]


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(out / "final").state_dict()


def test_two_steps_train_log_and_export(setup, tmp_path):
    root, model, _, _ = setup
    res = train.main(argv(setup, tmp_path, "--steps", "2", "--eval-every", "0", "--gen-batch-size", "1"))
    assert len(res.history) == 2
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if ln["kind"] == "train"]
    evals = [ln for ln in lines if ln["kind"] == "eval"]
    assert [ln["step"] for ln in steps] == [1, 2]
    assert [ln["step"] for ln in evals] == [0, 2]  # before and after training
    for ln in steps:
        for key in ("prompts_per_s", "tokens_per_s", "W", "U", "L", "format", "DA", "CQ", "AQ", "completion_len",
                    "kl", "clip_frac", "grad_norm", "eta_s", "lr", "judge_failed", "entropy"):
            assert key in ln, key
        assert 1 <= ln["completion_len"] <= 8
        assert 0 <= ln["DA"] + ln["CQ"] + ln["AQ"] <= 1
        assert ln["grad_norm"] > 0 and math.isfinite(ln["W"])
        # Same weights sampled and scored: the trainer's log-probs are the sampler's up to float noise.
        # fp32 on a CPU; bf16 autocast on CUDA (4e-4 measured in bf16 on a CPU)
        assert ln["logp_mismatch"] < (1e-4 if compute_dtype("auto", DEVICE) == torch.float32 else 2e-3)
        assert ln["clip_frac"] == 0.0  # on-policy (one optimizer step per rollout): ratio is exactly 1
    for ln in evals:
        assert ln["n"] == 4 and "welfare" in ln and "action_ok_DQ" in ln
    before, after = load_pretrained(model).state_dict(), final_params(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the weights"
    assert res.table is not None and "before" in res.table and "after" in res.table


def assert_same_params(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def test_resume_continues_exactly(setup, tmp_path):
    # Two optimizer steps per rollout (old log-probs recomputed), warm-up + cosine: every piece of state matters.
    # --device cpu: bit-for-bit comparisons need fp32 and deterministic kernels (a GPU's attention backward is not)
    common = ("--steps", "4", "--mini-batch-size", "1", "--lr-schedule", "cosine", "--warmup-steps", "2",
              "--device", "cpu")
    train.main(argv(setup, tmp_path / "full", *common))
    halted = train.main(argv(setup, tmp_path / "split", *common, "--halt-after", "2"))
    assert halted.final_dir is None and len(halted.history) == 2
    resumed = train.main(argv(setup, tmp_path / "split", *common, "--resume"))
    assert [m["step"] for m in resumed.history] == [3, 4]
    assert_same_params(final_params(tmp_path / "full"), final_params(tmp_path / "split"))
    # metrics.jsonl of the split run holds steps 1..4 once each, like the uninterrupted run's
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_micro_batching_does_not_change_the_update(setup, tmp_path, monkeypatch):
    # The step's loss is normalised by counts of the whole step, so 8 rows as 8 micro-batches of 1 or as one
    # of 8 give the same gradient. Plain SGD makes the update linear in it (Adam's first step is about
    # sign(g), which float noise flips where g is ~0). The last case adds a second epoch (old log-probs
    # recomputed, ratios away from 1) and the KL to the frozen initial model.
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, betas, weight_decay: torch.optim.SGD(params, lr=lr))
    cases = {"token": ["--loss-agg", "token-mean"], "sumnorm": ["--loss-agg", "seq-mean-token-sum-norm"],
             "kl-2ep": ["--loss-agg", "seq-mean-token-mean", "--kl-coef", "0.5", "--epochs", "2"]}
    for name, extra in cases.items():
        one = train.main(argv(setup, tmp_path / f"m1-{name}", "--steps", "1", "--micro-batch-size", "1",
                              "--device", "cpu", *extra))
        all8 = train.main(argv(setup, tmp_path / f"m8-{name}", "--steps", "1", "--micro-batch-size", "8",
                               "--device", "cpu", *extra))
        assert_same_params(final_params(tmp_path / f"m1-{name}"), final_params(tmp_path / f"m8-{name}"), atol=1e-5)
        m = all8.history[0]
        assert m["opt_steps"] == (2 if name == "kl-2ep" else 1)
        if name == "kl-2ep":  # the second epoch sees a moved policy: nonzero KL and ratio
            assert m["kl"] > 0 and m["approx_kl"] != 0
            assert m["kl"] == pytest.approx(one.history[0]["kl"], rel=1e-4)
        else:
            assert m["kl"] is None and m["approx_kl"] == 0


def test_bad_checkpoints_are_refused_and_kept(setup, tmp_path):
    out = tmp_path / "run"
    train.main(argv(setup, out, "--steps", "3", "--save-every", "1"))
    manifest = json.loads((out / "checkpoints.json").read_text())["checkpoints"]
    assert [e["file"] for e in manifest] == ["step_000002.pt", "step_000003.pt"]  # the last two are kept
    assert not (out / "step_000001.pt").exists()
    latest, previous = out / "step_000003.pt", out / "step_000002.pt"
    blob = latest.read_bytes()

    latest.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"step_000003\.pt: truncated checkpoint .*step_000002\.pt is intact"):
        train.main(argv(setup, out, "--steps", "3", "--resume"))
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF
    latest.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"step_000003\.pt: corrupt checkpoint \(SHA-256"):
        train.main(argv(setup, out, "--steps", "3", "--resume"))
    assert latest.exists() and previous.exists()  # nothing was deleted or overwritten

    res = train.main(argv(setup, out, "--steps", "3", "--resume", str(previous)))
    assert [m["step"] for m in res.history] == [3]

    stray = tmp_path / "elsewhere" / "ckpt.pt"  # not in any manifest: torch.load itself must fail clearly
    stray.parent.mkdir()
    stray.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        train.main(argv(setup, out, "--steps", "3", "--resume", str(stray)))


def test_bad_inputs_name_the_problem(setup, tmp_path):
    root, model, data, _ = setup
    with pytest.raises(UsageError, match="--model needs --data"):
        train.main(["--model", str(model)])
    with pytest.raises(UsageError, match="need --model"):
        train.main(["--data", str(data)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(UsageError, match=r"bad\.jsonl:2: not valid JSON"):
        train.main(["--model", str(model), "--data", str(bad)])
    medium = tmp_path / "medium.jsonl"
    rec = json.loads(data.read_text().splitlines()[0]) | {"data_source": "medium"}
    medium.write_text(json.dumps(rec) + "\n")
    with pytest.raises(UsageError, match="rule judge cannot score data_source medium"):
        train.main(["--model", str(model), "--data", str(medium), "--out-dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="must divide"):
        train.main(["--model", str(model), "--data", str(data), "--prompts-per-step", "4", "--mini-batch-size", "3"])
    with pytest.raises(UsageError, match="--fsdp needs several processes"):
        train.main(argv(setup, tmp_path / "f", "--fsdp"))
    with pytest.raises(UsageError, match=r"--max-new-tokens 4096 exceeds the model's max_position_embeddings \(512\)"):
        train.main(argv(setup, tmp_path / "long", "--max-new-tokens", "4096"))
    # port 9 (discard) is not listening on the test machine: the run stops before any work
    with pytest.raises(UsageError, match="judge server at http://127.0.0.1:9/v1/models is unreachable"):
        train.main(argv(setup, tmp_path / "judge", "--judge", "http://127.0.0.1:9/v1"))


def test_demo_defaults_apply_only_to_unset_flags():
    demo = train.parse_args([])
    assert demo.model is None and demo.lr == train.DEMO_DEFAULTS["lr"] and demo.out_dir == "out/demo"
    assert train.parse_args(["--lr", "0.5"]).lr == 0.5
    real = train.parse_args(["--model", "m", "--data", "d.jsonl"])
    assert real.lr == 1e-6 and real.weight_decay == 0.01 and real.mini_batch_size is None  # None: all prompts


def test_config_line_shows_only_the_flags_the_run_reads():
    real = train.applicable_flags(train.parse_args(["--model", "m", "--data", "d.jsonl"]))
    assert "sft_steps" not in real and "demo_train_size" not in real and "critic_lr" not in real
    assert real["lr"] == 1e-6 and real["judge"] == "rule"
    demo = train.applicable_flags(train.parse_args([]))
    assert demo["sft_steps"] == 300 and "critic_lr" not in demo
    ppo = train.applicable_flags(train.parse_args(["--model", "m", "--data", "d.jsonl", "--algo", "ppo"]))
    assert ppo["critic_lr"] == 2e-6 and ppo["gamma"] == 1.0 and "sft_steps" not in ppo


def test_export_keeps_the_inputs_dtype_and_generation_config(setup, tmp_path):
    import shutil
    from safetensors import safe_open
    root, model, data, evals = setup
    src = tmp_path / "bf16-model"
    shutil.copytree(model, src)
    m = load_pretrained(src, dtype=torch.bfloat16)
    from nano_gtalign.loader import load_tokenizer, save_pretrained
    save_pretrained(m, load_tokenizer(src), src, generation_config={"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                                    "repetition_penalty": 1.05})
    base = argv(setup, tmp_path / "run", "--steps", "1")
    base[base.index("--model") + 1] = str(src)
    train.main(base)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    gen = json.loads((final / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.8, 20, 1.05)
    train.main(argv(setup, tmp_path / "fp32", "--steps", "1", "--export-dtype", "float32"))
    assert json.loads((tmp_path / "fp32" / "final" / "config.json").read_text())["torch_dtype"] == "float32"


def test_training_evaluation_reports_each_source(setup, tmp_path, monkeypatch, capsys):
    root, model, data, _ = setup
    mixed = tmp_path / "mixed.jsonl"
    lines = data.read_text().splitlines()[:6]
    recs = [json.loads(ln) | ({"data_source": "minerva"} if i % 2 else {}) for i, ln in enumerate(lines)]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = argv(setup, tmp_path / "run", "--steps", "1", "--eval-every", "0")
    base[base.index("--eval-data") + 1] = str(mixed)
    res = train.main(base)
    printed = capsys.readouterr().out
    assert set(res.evals[0]["by_source"]) == {"arith_demo", "minerva"}
    # --eval-size 4 of 3 + 3 records: a seeded subset stratified by source, 2 of each (not the first 4)
    assert res.evals[0]["by_source"]["minerva"]["n"] == res.evals[0]["by_source"]["arith_demo"]["n"] == 2
    assert "  minerva | n 2 |" in printed and "  arith_demo | n 2 |" in printed


def test_help_shows_the_real_run_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (default: 1e-06)" in out and "(default: 40)" not in out  # not the demo's
    assert "demo defaults (no --model): --out-dir out/demo, --lr 0.0006" in out
    assert "one pass over the data) (default: None)" in out


def test_lr_schedule_by_hand():
    # warm-up: (s+1)/2; then cosine over the remaining 4 steps from 1 down to 0.1
    got = [lr_factor(s, 6, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1) for s in range(7)]
    want = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55,
            0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.1]
    assert got == pytest.approx(want)
    assert [lr_factor(s, 6, 2, "constant", 0.1) for s in (0, 1, 2, 5)] == [0.5, 1.0, 1.0, 1.0]


def test_pack_lines_up_completions_like_the_sampler():
    ids, mask, P, T = pack_rows([[5, 6, 7], [8]], torch.tensor([[1, 2, 0, 0], [3, 4, 9, 0]]),
                                torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool), pad_id=0)
    assert (P, T) == (3, 3)  # the last column is unused by every row and dropped
    assert ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]


def test_data_order_is_a_function_of_seed_epoch_and_position():
    cursor = Cursor()
    seen = [next_prompts(cursor, 10, 4, seed=3) for _ in range(3)]
    assert cursor == Cursor(epoch=1, pos=4)  # 10 records, 4 a step: the remainder of 2 is skipped
    assert sorted(seen[0] + seen[1]) == sorted(epoch_order(10, 3, 0)[:8].tolist())
    assert seen[2] == epoch_order(10, 3, 1)[:4].tolist()
    assert next_prompts(Cursor(epoch=0, pos=4), 10, 4, seed=3) == seen[1]


def test_concat_generations_pads_to_the_longest():
    from nano_gtalign.sampling import Generation
    a = Generation([[1]], torch.tensor([[5, 2]]), torch.tensor([[True, True]]), torch.tensor([[-1.0, -2.0]]),
                   ["a"], ["eos"])
    b = Generation([[1, 2], [3]], torch.tensor([[6, 7, 8], [9, 0, 0]]),
                   torch.tensor([[True, True, True], [True, False, False]]),
                   torch.tensor([[-0.5, -0.25, -0.125], [-3.0, 0.0, 0.0]]), ["b", "c"], ["length", "eos"])
    g = concat_generations([a, b], pad_id=0)
    assert g.prompt_ids == [[1], [1, 2], [3]] and g.texts == ["a", "b", "c"]
    assert g.finish_reasons == ["eos", "length", "eos"]
    assert g.completion_ids.tolist() == [[5, 2, 0], [6, 7, 8], [9, 0, 0]]
    assert g.completion_mask.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert g.logprobs.tolist() == [[-1.0, -2.0, 0.0], [-0.5, -0.25, -0.125], [-3.0, 0.0, 0.0]]


def test_sampled_evaluation_is_repeatable(setup):
    # The same policy evaluated twice draws the same tokens: a before/after difference is the policy's.
    root, model, _, evals = setup
    from nano_gtalign.loader import load_tokenizer
    cfg = TrainConfig(max_new_tokens=8, eval_temperature=1.0, eval_samples=3)
    tok = load_tokenizer(model)
    policy = Policy(load_pretrained(model), torch.float32, "auto")
    records = read_records(evals)
    ids = [tok.encode_chat(r["prompt"]) for r in records]
    a = evaluate.evaluate_policy(policy, tok, records, ids, cfg, make_judge("rule"), Dist())
    b = evaluate.evaluate_policy(policy, tok, records, ids, cfg, make_judge("rule"), Dist())
    assert a == b and a["n"] == 3 * len(records)
    with pytest.raises(UsageError, match="eval-temperature"):
        train.parse_args(["--model", str(model), "--data", "x", "--eval-samples", "3"])
