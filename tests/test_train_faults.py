"""train.py under faults: a judge that keeps failing, Ctrl-C / SIGTERM, an unwritable --out-dir, a torn
metrics.jsonl, and the demo's resume against the right KL reference.

The interrupt test runs this file as a worker process (`python tests/test_train_faults.py OUT ARGS...`): it
runs train.main with the stand-in reward of tests/test_train.py and exits with the run's exit code.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from nano_gtalign import evaluate, rollout
from nano_gtalign.errors import UsageError
from nano_gtalign.scoring import RewardBreakdown
from tests.processes import running
from tests.test_train import argv, fake_score_batch, final_params, setup  # noqa: F401 (setup: a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fake_reward(monkeypatch):
    monkeypatch.setattr(rollout, "score_batch", fake_score_batch)
    monkeypatch.setattr(evaluate, "score_batch", fake_score_batch)


def failing_score_batch(completions, records, judge, **kwargs):
    """Every judgement failed, as with a judge server that answers 500 to everything."""
    nan = float("nan")
    return [RewardBreakdown(
        format=0.0, payoff_spread=0.0, pareto_consistency=0.0, answer_user=nan, answer_llm=nan,
        response_band=0.0, reasoning_brevity=0.0, full_band=0.0, user=nan, llm=nan, welfare=nan,
        action=None, question_type=None, strategy=None, judge_failed=True, parse_error=None,
        data_source=r["data_source"], judge_error="judge HTTP 500 after 4 tries") for r in records]


def test_a_failing_judge_stops_the_run_with_a_checkpoint(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rollout, "score_batch", failing_score_batch)
    out = tmp_path / "run"
    res = train.main(argv(setup, out, "--steps", "10", "--judge-failure-window", "2"))
    printed = capsys.readouterr().out
    assert res.exit_code == 3 and [m["step"] for m in res.history] == [1, 2]
    assert res.final_dir is None and (out / "step_000002.pt").exists()
    first = [ln for ln in printed.splitlines() if ln.startswith("step    1/")][0]
    assert "W - U - L - | judge failed 100%" in first  # never "W 0.000"
    assert "stopped after step 2: the judge failed on 100% of the last 2 steps' samples" in printed
    assert "judge HTTP 500 after 4 tries" in printed and "continue with --resume" in printed
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["W"] is None and line["judge_failure_rate"] == 1.0
    # --max-judge-failures 1 never stops
    res = train.main(argv(setup, tmp_path / "never", "--steps", "3", "--judge-failure-window", "1",
                          "--max-judge-failures", "1"))
    assert res.exit_code == 0 and len(res.history) == 3


def test_judge_failure_mode_reaches_the_reward(setup, tmp_path, monkeypatch):
    seen = []

    def recording(completions, records, judge, **kwargs):
        seen.append(kwargs)
        return fake_score_batch(completions, records, judge)
    monkeypatch.setattr(rollout, "score_batch", recording)
    train.main(argv(setup, tmp_path / "zero", "--steps", "1", "--judge-failure", "zero"))
    assert seen and all(kw["judge_failure"] == "zero" for kw in seen)


def test_unwritable_out_dir_is_refused_before_any_work(setup, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"--out-dir .*a-file/run: cannot write there"):
        train.main(argv(setup, blocker / "run", "--steps", "1"))


def test_a_torn_metrics_line_does_not_block_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--steps", "3", "--lr-schedule", "cosine")
    train.main(argv(setup, out, *common, "--halt-after", "2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "W": 0.5')  # the process died while writing
    res = train.main(argv(setup, out, *common, "--resume"))
    assert "dropped a partial last line" in capsys.readouterr().out
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and res.exit_code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: not valid JSON"):
        train.main(argv(setup, out, "--steps", "4", "--lr-schedule", "cosine", "--resume"))


def worker(out: str, args: list[str]) -> None:
    rollout.score_batch = evaluate.score_batch = fake_score_batch
    res = train.main(args)
    sys.stdout.flush()
    os._exit(res.exit_code)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_resume_is_exact(setup, tmp_path, signum):
    common = ["--steps", "6", "--save-every", "0", "--lr-schedule", "cosine"]
    train.main(argv(setup, tmp_path / "full", *common))
    out = tmp_path / "split"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with running([sys.executable, __file__, str(out), *argv(setup, out, *common)], cwd=ROOT, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        lines = []
        for line in proc.stdout:  # signal as soon as the first step is done, mid-run
            lines.append(line)
            if line.startswith("step    1/"):
                proc.send_signal(signum)
                break
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 128 + signum, "".join(lines)
    text = "".join(lines)
    assert f"interrupted by {signal.Signals(signum).name} after step" in text and "continue with --resume" in text
    said = f"{signal.Signals(signum).name} received: the run stops after this step, with a checkpoint"
    assert said in text and text.index(said) < text.index("interrupted by")  # said when the signal came
    stopped = int(text.split("interrupted by")[1].split("after step ")[1].split(";")[0])
    assert 1 <= stopped < 6 and (out / f"step_{stopped:06d}.pt").exists()
    resumed = train.main(argv(setup, out, *common, "--resume"))
    assert resumed.history[0]["step"] == stopped + 1
    for k, v in final_params(tmp_path / "full").items():
        torch.testing.assert_close(final_params(out)[k], v, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_demo_resume_uses_the_warm_started_reference(tmp_path):
    # KL on: a resumed demo whose reference were not the warm-started model would diverge at once.
    small = ["--demo-train-size", "40", "--sft-steps", "4", "--eval-every", "-1", "--prompts-per-step", "4",
             "--group-size", "2", "--max-new-tokens", "24", "--steps", "3", "--kl-coef", "0.5"]
    full = train.main(small + ["--out-dir", str(tmp_path / "full")])
    train.main(small + ["--out-dir", str(tmp_path / "split"), "--halt-after", "1"])
    assert (tmp_path / "split" / "warm_start" / "config.json").exists()
    resumed = train.main(small + ["--out-dir", str(tmp_path / "split"), "--resume"])
    assert [m["kl"] for m in resumed.history] == [m["kl"] for m in full.history[1:]]
    for k, v in final_params(tmp_path / "full").items():
        torch.testing.assert_close(final_params(tmp_path / "split")[k], v, rtol=0, atol=1e-6)
    empty = tmp_path / "nothing"
    with pytest.raises(UsageError, match="no saved warm-start to resume the demo from"):
        train.main(small + ["--out-dir", str(empty), "--resume", str(tmp_path / "split" / "step_000001.pt")])


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
