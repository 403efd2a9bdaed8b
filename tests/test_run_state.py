"""A run is never silently mixed, truncated or lost (nano_gtalign/outdir.py, train.py): one run per out-dir,
no silent overwrite, a resume that changes the run or its data is refused, another architecture is one line,
a failed export leaves the training resumable, a non-finite update never reaches the weights."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import nano_gtalign.checkpoint as ckpt
import train
from nano_gtalign import grpo, rollout
from nano_gtalign.distributed import Dist
from nano_gtalign.errors import UsageError
from nano_gtalign.loader import CheckpointError, load_pretrained
from nano_gtalign.outdir import LOCK, exclusive
from tests.test_train import argv, fake_score_batch, setup  # noqa: F401 (setup: a fixture)
from tests.tiny import make_hf_model


@pytest.fixture(autouse=True)
def fake_reward(monkeypatch):
    monkeypatch.setattr(rollout, "score_batch", fake_score_batch)


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with exclusive(out, Dist()):  # the first run, alive
        with pytest.raises(UsageError) as info:
            train.main(argv(setup, out, "--steps", "1"))
    msg = one_line(info)
    assert f"--out-dir {out}: another train.py run is using it (PID {os.getpid()} on " in msg and "started" in msg
    assert not (out / "metrics.jsonl").exists()  # the second run did nothing
    res = train.main(argv(setup, out, "--steps", "1"))  # the first one is gone: the lock is free
    assert res.exit_code == 0 and "took over" not in capsys.readouterr().out


def test_a_dead_runs_lock_is_taken_over_with_a_message(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "2026-01-01 00:00:00"}))
    assert train.main(argv(setup, out, "--steps", "1")).exit_code == 0
    printed = capsys.readouterr().out
    assert f"took over {out / LOCK} from a run that is no longer running (PID 999999 on elsewhere" in printed


def test_a_fresh_run_over_checkpoints_is_refused_unless_overwrite(setup, tmp_path):
    out = tmp_path / "run"
    train.main(argv(setup, out, "--steps", "3", "--halt-after", "1"))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UsageError) as info:
        train.main(argv(setup, out, "--steps", "3"))
    msg = one_line(info)
    assert "holds the checkpoints of an earlier run (latest step 1)" in msg and "--resume" in msg and "--overwrite" in msg
    assert (out / "step_000001.pt").exists() and (out / "metrics.jsonl").read_text() == before  # nothing touched
    res = train.main(argv(setup, out, "--steps", "2", "--overwrite"))
    assert res.exit_code == 0 and not (out / "step_000001.pt").exists()
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_a_changed_flag_and_applies_those_that_may_change(setup, tmp_path):
    out = tmp_path / "run"
    train.main(argv(setup, out, "--steps", "3", "--lr", "1e-2", "--halt-after", "1"))
    with pytest.raises(UsageError) as info:
        train.main(argv(setup, out, "--steps", "3", "--lr", "1e-3", "--resume"))
    msg = one_line(info)
    assert msg.startswith("--lr was 0.01 in the checkpoint, 0.001 now") and "--steps" in msg
    # --steps and --save-every may change, and take effect: two more steps, each saved
    res = train.main(argv(setup, out, "--steps", "3", "--lr", "1e-2", "--save-every", "1", "--resume"))
    assert [m["step"] for m in res.history] == [2, 3]
    assert (out / "step_000002.pt").exists() and (out / "step_000003.pt").exists()


def test_resume_refuses_changed_data_unless_accepted(setup, tmp_path, capsys):
    root, model, data, evals = setup
    mine = tmp_path / "train.jsonl"
    mine.write_text(data.read_text())
    args = ["--model", str(model), "--data", str(mine), "--eval-data", str(evals), "--out-dir", str(tmp_path / "run"),
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-every", "-1",
            "--save-every", "0", "--steps", "3"]
    train.main(args + ["--halt-after", "1"])
    lines = mine.read_text().splitlines()
    mine.write_text("\n".join(lines[len(lines) // 2:] + lines[:len(lines) // 2]) + "\n")  # same records, reordered
    with pytest.raises(UsageError) as info:
        train.main(args + ["--resume"])
    assert f"--data {mine} changed since the checkpoint" in one_line(info) and "--accept-changed-data" in one_line(info)
    res = train.main(args + ["--resume", "--accept-changed-data"])
    assert res.exit_code == 0 and f"warning: --data {mine} changed since the checkpoint" in capsys.readouterr().out


def test_resume_with_another_architecture_is_one_line(setup, tmp_path):
    root, model, data, evals = setup
    mine = tmp_path / "model"
    make_hf_model(mine)
    out = tmp_path / "run"
    common = ["--model", str(mine), "--data", str(data), "--eval-data", str(evals), "--out-dir", str(out),
              "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-every", "-1",
              "--save-every", "0", "--steps", "3"]
    train.main(common + ["--halt-after", "1"])
    make_hf_model(mine, hidden_size=48)  # the same path, another shape
    with pytest.raises(CheckpointError) as info:
        train.main(common + ["--resume"])
    assert "does not fit this run's model" in one_line(info) and "written for another architecture" in one_line(info)


def test_a_failed_export_leaves_the_training_resumable(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = ckpt.save_pretrained

    def disk_full(model, tokenizer, path, **kw):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_pretrained", disk_full)
    with pytest.raises(CheckpointError) as info:
        train.main(argv(setup, out, "--steps", "2"))  # --save-every 0: no checkpoint before the export
    msg = one_line(info)
    assert "exporting failed (No space left on device)" in msg and "step_000002.pt" in msg and "--resume" in msg
    assert (out / "step_000002.pt").exists() and not list(out.glob(".final.tmp-*")) and not (out / "final").exists()
    monkeypatch.setattr(ckpt, "save_pretrained", real_save)
    res = train.main(argv(setup, out, "--steps", "2", "--resume"))  # nothing left to train: it exports
    assert res.final_dir == out / "final" and (out / "final" / "config.json").exists() and res.history == []


def test_a_non_finite_update_is_never_applied_and_stops_the_run(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_loss = grpo.policy_loss

    def nan_in_step_two(logp, *args, **kwargs):
        loss, stats = real_loss(logp, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 3 else loss), stats  # step 1 has 3 micro-batches
    monkeypatch.setattr(grpo, "policy_loss", nan_in_step_two)
    res = train.main(argv(setup, out, "--steps", "4", "--micro-batch-size", "3"))
    assert res.exit_code == 4 and [m["step"] for m in res.history] == [1, 2] and res.final_dir is None
    state, _ = ckpt.load_checkpoint("latest", out)
    assert state["step"] == 2
    weights = {k: v for k, v in state["model"].items()}
    assert all(torch.isfinite(v).all() for v in weights.values())
    monkeypatch.setattr(grpo, "policy_loss", real_loss)
    after_step_one = train.main(argv(setup, tmp_path / "one", "--steps", "1")).final_dir
    for k, v in load_pretrained(after_step_one).state_dict().items():  # step 2's update was not applied
        torch.testing.assert_close(weights["model." + k], v, rtol=0, atol=0)


def test_a_non_finite_model_is_never_exported(setup, tmp_path):
    policy = train.main(argv(setup, tmp_path / "run", "--steps", "1")).policy
    with torch.no_grad():
        next(policy.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="not exported: the trained weights are not finite"):
        ckpt.export_final(policy, None, tmp_path / "nan_final", False, Dist())
