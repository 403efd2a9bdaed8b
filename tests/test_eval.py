"""eval.py: hand-computed metrics on fixture completions across tasks, run comparison, and the
model path end to end on a tiny random model (also sharded over two torchrun ranks)."""
import json
import math
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval as evaluate
import nano_gtalign.http_judge as http_judge
import nano_gtalign.judges as judges
from nano_gtalign.judges import RuleJudge, Verdict
from nano_gtalign.loader import load_tokenizer
from tests.processes import running
from tests.test_judges import FakeJudgeServer
from tests.tiny import make_hf_model

ROOT = Path(__file__).resolve().parents[1]
PAY = json.dumps({"DQ_AQ": {"LLM": 2.0, "user": 3.0}, "DQ_CQ": {"LLM": 1.0, "user": 1.5},
                  "DQ_DA": {"LLM": 3.0, "user": 2.0}, "VQ_AQ": {"LLM": 1.5, "user": 2.0},
                  "VQ_CQ": {"LLM": 0.5, "user": 1.0}, "VQ_DA": {"LLM": 2.0, "user": 0.5}})


def record(src, question, gt):
    return {"prompt": [{"role": "user", "content": question}], "data_source": src,
            "reward_model": {"ground_truth": gt, "style": "rule"}, "extra_info": {"single_turn_prompt": question}}


def reasoning(choice):
    return f"<thinking>Think.</thinking><payoff>{PAY}</payoff><analyze>Choose {choice}.</analyze>"


def completion(choice, response):
    return reasoning(choice) + f"<response>{response}</response>"


FIXTURE = [
    (record("arith_demo", "What is 37 + 48?", "85"), completion("DQ_DA", "85")),                        # right
    (record("arith_demo", "Add 37 to my number.", "vague"), completion("VQ_CQ", "What is your number?")),  # right
    (record("math-hard", "What is 3 * 4?", "12"), completion("DQ_AQ", "It is \\boxed{13}. Want steps?")),  # wrong
    (record("medium", "Write a haiku.", "Autumn moon"), completion("DQ_DA", "Moon over water")),  # rule judge fails
    (record("math-hard", "What is 2 + 2?", "4"), "<thinking>no blocks at all"),                  # all zeros
]


def sig(x):
    return 1 / (1 + math.exp(-x))


def band(n, lo, hi):  # docs/reward.md with the word count n written out
    return sig(0.005 * (n - lo)) * sig(0.005 * (hi - n))


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def run_completions(tmp_path, capsys, monkeypatch):
    """FIXTURE scored by the rule judge past eval.py's up-front check (which refuses medium for the rule judge),
    so medium's judgement fails as an HTTP judge's can."""
    use_judge(monkeypatch, CountingJudge())
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": r, "completion": c} for r, c in FIXTURE])
    evaluate.main(["--completions", str(src), "--out", str(tmp_path / "o.json"),
                   "--per-sample", str(tmp_path / "ps.jsonl")])
    return capsys.readouterr().out, json.loads((tmp_path / "o.json").read_text())["metrics"]


def test_completions_metrics_by_hand(tmp_path, capsys, monkeypatch):
    out, m = run_completions(tmp_path, capsys, monkeypatch)
    r = len(reasoning("DQ_DA"))  # the three reasoning prefixes have the same length
    assert r == len(reasoning("VQ_CQ")) == len(reasoning("DQ_AQ")) == 292
    # whitespace words of each whole completion: 30 in the payoff JSON + those after "Choose"
    assert [len(c.split()) for _, c in FIXTURE[:3]] == [31, 34, 35]
    # PAY gives both players different payoffs (> 10% apart) in all six cells: spread 1
    U1 = 1e-4 + 0.5 * 1 + 0.2 * band(1, 20, 500) + 0.3 * math.exp(-292 / 500)
    U2 = 1e-4 + 0.5 * 1 + 0.2 * band(4, 20, 500) + 0.3 * math.exp(-292 / 500)
    U3 = 1e-4 + 0.5 * 0 + 0.2 * band(5, 20, 500) + 0.3 * math.exp(-292 / 500)
    L1 = 1e-4 + 0.2 * 1 + 0.2 * 1 + 0.4 * 1 + 0.2 * band(31, 500, 1000)
    L2 = 1e-4 + 0.2 * 1 + 0.2 * 1 + 0.4 * 1 + 0.2 * band(34, 500, 1000)
    L3 = 1e-4 + 0.2 * 1 + 0.2 * 1 + 0.4 * 0 + 0.2 * band(35, 500, 1000)
    arith, math_hard, medium, overall = m["arith_demo"], m["math-hard"], m["medium"], m["overall"]
    assert arith["user"] == pytest.approx((U1 + U2) / 2) and arith["llm"] == pytest.approx((L1 + L2) / 2)
    assert arith["w_cd"] == pytest.approx((math.sqrt(U1 * L1) + math.sqrt(U2 * L2)) / 2)
    # math-hard: the wrong answer and the block-less completion (U = L = 0, not judged)
    assert math_hard["user"] == pytest.approx(U3 / 2) and math_hard["llm"] == pytest.approx(L3 / 2)
    assert (math_hard["format_rate"], math_hard["parse_rate"], math_hard["answer_llm"]) == (0.5, 0.5, 0.0)
    # medium: the judge failed on it -> left out, not zero
    assert medium["judge_failure_rate"] == 1.0 and medium["user"] is None and medium["n_scored"] == 0
    assert (overall["n"], overall["n_scored"]) == (5, 4)
    assert (overall["format_rate"], overall["parse_rate"], overall["judge_failure_rate"]) == (0.8, 0.8, 0.2)
    assert overall["answer_llm"] == 0.5  # (1 + 1 + 0 + 0) / 4 scored
    assert overall["user"] == pytest.approx((U1 + U2 + U3 + 0) / 4)
    assert overall["w_linear"] == pytest.approx(((U1 + L1) + (U2 + L2) + (U3 + L3)) / 2 / 4)
    # VQ_CQ is dominated in PAY (by DQ_AQ), the other three named keys are on the frontier
    assert overall["pareto_consistency"] == pytest.approx(3 / 4)
    assert overall["actions"] == {"DQ_AQ": 0.2, "DQ_CQ": 0.0, "DQ_DA": 0.4, "VQ_AQ": 0.0, "VQ_CQ": 0.2,
                                  "VQ_DA": 0.0, "none": 0.2}
    assert overall["reasoning_chars"] == (292 * 4 + len(FIXTURE[4][1])) / 5
    assert overall["response_words"] == (1 + 4 + 5 + 3 + 0) / 5
    assert overall["reasoning_tokens"] is None  # no --tokenizer
    assert "judge failed on 1/5 completions" in out
    lines = out.splitlines()
    assert any(l.split()[:4] == ["overall", "5", "0.800", "0.800"] for l in lines)


def test_per_sample_file_rescores_and_compares(tmp_path, capsys, monkeypatch):
    run_completions(tmp_path, capsys, monkeypatch)
    ps = [json.loads(l) for l in (tmp_path / "ps.jsonl").read_text().splitlines()]
    assert len(ps) == 5 and ps[3]["breakdown"]["judge_failed"] and ps[3]["user"] is None
    assert ps[0]["completion"] == FIXTURE[0][1] and ps[0]["record"] == FIXTURE[0][0]
    # a per-sample file is a valid --completions file: same numbers again
    evaluate.main(["--completions", str(tmp_path / "ps.jsonl"), "--out", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())["metrics"]
    assert again == json.loads((tmp_path / "o.json").read_text())["metrics"]
    # b: the first prompt gets a higher U, the third a lower L -> one win each way
    b = [dict(r) for r in ps]
    b[0]["user"] += 0.1
    b[2]["llm"] -= 0.1
    write_jsonl(tmp_path / "b.jsonl", b)
    capsys.readouterr()
    evaluate.main(["--compare", str(tmp_path / "ps.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    c = json.loads((tmp_path / "c.json").read_text())["compare"]
    assert c["n_matched"] == 4  # the medium prompt has no scored sample in either run
    assert c["dominance"] == {"a_dominates_b": 1, "b_dominates_a": 1, "equal": 2, "incomparable": 0}
    assert "b dominates ps on 1" in out
    write_jsonl(tmp_path / "x.jsonl", [{"x": 1}])
    with pytest.raises(SystemExit, match="x.jsonl:1: not an eval.py --per-sample line"):
        evaluate.main(["--compare", str(tmp_path / "ps.jsonl"), str(tmp_path / "x.jsonl")])


def test_paper_metrics_single_run_and_compare(tmp_path, capsys, monkeypatch):
    use_judge(monkeypatch, CountingJudge())  # past the up-front check: medium's judgement fails
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": r, "completion": c} for r, c in FIXTURE])
    evaluate.main(["--completions", str(src), "--paper-metrics", "--out", str(tmp_path / "o.json"),
                   "--per-sample", str(tmp_path / "ps.jsonl")])
    out = capsys.readouterr().out
    ours, paper = out.index("\nscores "), out.index("\nthe paper's definitions (upstream experiments/basic_metrics.py)")
    assert ours < paper   # our tables first, the paper's under its own heading after them
    m = json.loads((tmp_path / "o.json").read_text())["paper_metrics"]
    o = m["overall"]
    # the block-less completion is dropped; the other four are well formed with spread 1: 0.1 + 0.15
    assert (o["n"], o["n_kept"], o["n_answered"]) == (5, 4, 3) and o["format"] == pytest.approx(0.25)
    assert o["answer"] == pytest.approx(2 / 3)   # arith 1, 1, math-hard 0; the medium judge failed
    resp = [2, len("What is your number?"), len("It is \\boxed{13}. Want steps?"), len("Moon over water")]
    assert resp == [2, 20, 29, 15]
    assert o["response_chars"] == pytest.approx(sum(resp) / 4)
    assert o["total_chars"] == pytest.approx(sum(len(c) for _, c in FIXTURE[:4]) / 4)
    assert o["response_ratio"] == pytest.approx(sum(resp) / sum(len(c) for _, c in FIXTURE[:4]))
    assert (m["math-hard"]["n"], m["math-hard"]["n_kept"]) == (2, 1)
    assert any(l.split()[:5] == ["overall", "5", "4", "0.250", "0.667"] for l in out.splitlines())
    # --compare: the joint-frontier definitions, with the hypervolume flagged where it is printed
    b = [json.loads(l) for l in (tmp_path / "ps.jsonl").read_text().splitlines()]
    b[0]["user"] += 0.1
    write_jsonl(tmp_path / "b.jsonl", b)
    evaluate.main(["--compare", str(tmp_path / "ps.jsonl"), str(tmp_path / "b.jsonl"), "--paper-metrics",
                   "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "the paper's definitions (upstream experiments/pareto_ratio.py), on the joint frontier:" in out
    assert "hv_pub(BUG): the hypervolume as published is a bug" in out
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["paper_compare"]["n_matched"] == c["compare"]["n_matched"] == 4
    # b's point is at least a's on every prompt: b is nowhere further from the joint frontier, and on
    # it wherever a is; a's first point, dominated by b's, is not on it
    pa, pb = c["paper_compare"]["a"], c["paper_compare"]["b"]
    assert pb["regret"] <= pa["regret"] and pb["on_frontier"] >= pa["on_frontier"] and pa["on_frontier"] < 1
    evaluate.main(["--compare", str(tmp_path / "ps.jsonl"), str(tmp_path / "b.jsonl")])
    assert "the paper's definitions" not in capsys.readouterr().out   # only when asked


def test_bad_inputs_are_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so the defaults out/demo/... certainly do not exist
    with pytest.raises(SystemExit, match=r"no records file at out/demo/test.jsonl \(run `python train.py` first"):
        evaluate.main([])
    write_jsonl(tmp_path / "d.jsonl", [record("arith_demo", "What is 1 + 1?", "2")])
    with pytest.raises(SystemExit, match="no model directory at out/demo/final: run `python train.py` first"):
        evaluate.main(["--data", "d.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"record": {}, "completion": "x"}\nnot json\n')
    with pytest.raises(SystemExit, match="--limit must be >= 1, got 0"):
        evaluate.main(["--completions", "bad.jsonl", "--limit", "0"])
    with pytest.raises(SystemExit, match="bad.jsonl:2: not valid JSON"):
        evaluate.main(["--completions", "bad.jsonl"])
    write_jsonl(tmp_path / "c.jsonl", [{"record": {**FIXTURE[0][0], "data_source": "chess"}, "completion": "x"}])
    with pytest.raises(SystemExit, match="c.jsonl:1: unknown data_source 'chess'"):
        evaluate.main(["--completions", "c.jsonl"])
    with pytest.raises(SystemExit, match="judge spec must be 'rule' or an http"):
        evaluate.main(["--completions", str(write_jsonl(tmp_path / "ok.jsonl", [
            {"record": FIXTURE[0][0], "completion": FIXTURE[0][1]}])), "--judge", "gpt"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="--plot needs matplotlib, which is not installed"):
            evaluate.main(["--completions", "ok.jsonl", "--plot", "p.png"])
    else:
        evaluate.main(["--completions", "ok.jsonl", "--plot", "p.png"])
        assert (tmp_path / "p.png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalmodel")
    model = make_hf_model(d / "model")
    data = write_jsonl(d / "test.jsonl", [record("arith_demo", q, gt) for q, gt in
                                          [("What is 37 + 48?", "85"), ("Add 5 to my number.", "vague"),
                                           ("What is 7 × 8?", "56")]])
    return d, model, data


def test_model_path_end_to_end(tiny_run, capsys):
    d, model, data = tiny_run
    evaluate.main(["--model", str(model), "--data", str(data), "--max-new-tokens", "6", "--batch-size", "2",
                   "--num-samples", "2", "--temperature", "1.0", "--seed", "1",
                   "--out", str(d / "o.json"), "--per-sample", str(d / "ps.jsonl")])
    out = capsys.readouterr().out
    o = json.loads((d / "o.json").read_text())
    ps = [json.loads(l) for l in (d / "ps.jsonl").read_text().splitlines()]
    assert o["n_samples"] == 6 and len(ps) == 6 and o["metrics"]["overall"]["n"] == 6
    assert [(p["record"]["extra_info"]["single_turn_prompt"], p["sample"]) for p in ps] == [
        ("What is 37 + 48?", 0), ("What is 37 + 48?", 1), ("Add 5 to my number.", 0), ("Add 5 to my number.", 1),
        ("What is 7 × 8?", 0), ("What is 7 × 8?", 1)]
    # a random model writes no four-block answer: zero format, and every row carries token counts
    assert o["metrics"]["overall"]["format_rate"] == 0.0
    # generated_tokens: what the sampler produced (EOS included), at most --max-new-tokens;
    # the other counts re-encode the text (no <response> block: all of it is reasoning)
    tok = load_tokenizer(model)
    assert all(1 <= p["generated_tokens"] <= 6 for p in ps)
    assert all(p["total_tokens"] == p["reasoning_tokens"] == len(tok.encode(p["completion"])) for p in ps)
    assert all(p["response_tokens"] == 0 for p in ps)
    assert o["metrics"]["overall"]["generated_tokens"] == sum(p["generated_tokens"] for p in ps) / 6
    assert sum(o["finish_reasons"].values()) == 6 and "finish reasons:" in out


@pytest.mark.slow
def test_torchrun_shards_and_gathers(tiny_run, tmp_path):
    """Two gloo ranks on CPU produce the same per-sample rows as one process (greedy)."""
    d, model, data = tiny_run
    common = ["--model", str(model), "--data", str(data), "--max-new-tokens", "5", "--temperature", "0",
              "--device", "cpu"]
    evaluate.main(common + ["--per-sample", str(tmp_path / "one.jsonl")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # 2 gloo ranks, even on a 1-GPU machine
    with socket.socket() as s:  # a free port: other test runs on this machine may hold a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "eval.py"] + common + ["--per-sample", str(tmp_path / "two.jsonl")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "world_size=2" in proc.stdout
    one = [json.loads(l) for l in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(one) == 3 and one == two


# -----------------------------------------------------------------------------
# fault handling: failed judgements, judge options, checks before any judge call, interrupt and resume

class CountingJudge(RuleJudge):
    """The rule judge, counting what it is asked; `interrupt_at` raises KeyboardInterrupt on that call."""

    def __init__(self, interrupt_at=None):
        self.calls, self.asked, self.interrupt_at = 0, [], interrupt_at

    def check(self):
        pass

    def judge_many(self, requests):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.asked += [r.question for r in requests]
        return super().judge_many(requests)


class FailingJudge(CountingJudge):
    def judge_many(self, requests):
        self.calls += 1
        return [Verdict(None, failed=True, error=f"judge server answered HTTP 500: boom {i % 2}")
                for i in range(len(requests))]


def use_judge(monkeypatch, judge):
    monkeypatch.setattr(evaluate, "open_configured_judge", lambda options, sources: judge)
    return judge


def exit_code(argv, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_mostly_failed_judgements_exit_3_after_writing(tmp_path, monkeypatch, capsys):
    use_judge(monkeypatch, FailingJudge())
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": r, "completion": c} for r, c in FIXTURE])
    code, out, err = exit_code(["--completions", str(src), "--out", str(tmp_path / "o.json"),
                                "--per-sample", str(tmp_path / "ps.jsonl")], capsys)
    assert code == 3
    # the block-less completion is never judged: 4 of the 4 judged failed
    loud = [l for l in err.splitlines() if "judge failed on 4 of 4" in l]
    assert len(loud) == 1 and "boom 0" in loud[0] and "boom 1" in loud[0]
    assert json.loads((tmp_path / "o.json").read_text())["metrics"]["overall"]["judge_failure_rate"] == 0.8
    assert len((tmp_path / "ps.jsonl").read_text().splitlines()) == 5
    assert "overall" in out  # the table is still printed


def test_judge_options_reach_the_http_judge(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_make_judge(spec, **options):
        seen.append(options)
        return CountingJudge()

    monkeypatch.setattr(http_judge, "make_judge", fake_make_judge)
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": FIXTURE[0][0], "completion": FIXTURE[0][1]}])
    url = ["--completions", str(src), "--judge", "http://127.0.0.1:9/v1"]
    evaluate.main(url + ["--judge-timeout", "2.5", "--judge-concurrency", "3"])
    evaluate.main(url)
    paper = judges.JudgeSettings().request_options()  # the paper's judge sampling, by default
    assert seen == [{"timeout": 2.5, "max_concurrency": 3, **paper}, {"timeout": 60.0, "max_concurrency": 32, **paper}]
    evaluate.main(url + ["--judge-max-tokens", "1024", "--judge-top-k", "0", "--judge-extra-body", "{}"])
    assert seen[-1]["max_tokens"] == 1024 and seen[-1]["top_k"] is None and seen[-1]["extra_body"] == {}
    for argv, words in ((["--judge-timeout", "0"], "argument --judge-timeout: must be a number > 0, got '0'"),
                        (["--judge-concurrency", "0"], "argument --judge-concurrency: must be an integer >= 1")):
        with pytest.raises(SystemExit):
            evaluate.main(url + argv)
        assert words in capsys.readouterr().err


def test_judge_failure_zero_scores_failed_judgements(tmp_path, monkeypatch, capsys):
    # Upstream's convention: a failed judgement is a verdict of 0, so it is averaged in (and still counted).
    use_judge(monkeypatch, FailingJudge())
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": FIXTURE[0][0], "completion": FIXTURE[0][1]}])
    code, _, _ = exit_code(["--completions", str(src), "--out", str(tmp_path / "x.json")], capsys)
    excluded = json.loads((tmp_path / "x.json").read_text())["metrics"]["overall"]
    code_zero, _, _ = exit_code(["--completions", str(src), "--out", str(tmp_path / "z.json"),
                                 "--judge-failure", "zero"], capsys)
    zero = json.loads((tmp_path / "z.json").read_text())["metrics"]["overall"]
    assert code == code_zero == 3  # most judgements failed either way: said loudly
    assert excluded["welfare"] is None and excluded["judge_failure_rate"] == 1.0
    assert zero["welfare"] is not None and zero["answer_llm"] == 0.0 and zero["judge_failure_rate"] == 1.0


def test_inputs_and_outputs_are_checked_before_any_judge_call(tmp_path, monkeypatch, capsys):
    judge = use_judge(monkeypatch, CountingJudge())
    good = {"record": FIXTURE[0][0], "completion": FIXTURE[0][1]}
    lines = [json.dumps(good)] * 298 + ["", json.dumps({**good, "record": {**good["record"], "data_source": "chess"}})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match="c.jsonl:300: unknown data_source 'chess'"):
        evaluate.main(["--completions", str(tmp_path / "c.jsonl")])
    wild = {"record": record("wildguard", "How do I pick a lock?", "maybe"), "completion": "x"}
    write_jsonl(tmp_path / "w.jsonl", [good, wild])
    with pytest.raises(SystemExit, match='w.jsonl:2: wildguard ground truth must be "harmful"'):
        evaluate.main(["--completions", str(tmp_path / "w.jsonl")])
    ok = write_jsonl(tmp_path / "ok.jsonl", [good])
    (tmp_path / "file").write_text("")
    cases = [("--out", tmp_path, "is a directory"), ("--per-sample", tmp_path / "file" / "ps.jsonl", "cannot be written")]
    try:
        import matplotlib  # noqa: F401
        cases.append(("--plot", tmp_path / "file" / "p.png", "cannot be written"))
    except ImportError:  # --plot is refused earlier, for want of matplotlib
        pass
    for flag, path, why in cases:
        with pytest.raises(SystemExit, match=f"{flag} {path} {why}"):
            evaluate.main(["--completions", str(ok), flag, str(path)])
    assert judge.calls == 0


def test_non_utf8_input_is_one_line(tmp_path, capsys):
    good = json.dumps({"record": FIXTURE[0][0], "completion": FIXTURE[0][1]}).encode()
    (tmp_path / "c.jsonl").write_bytes(good + b"\n" + good.replace(b"85", b"8\xff5") + b"\n")
    with pytest.raises(SystemExit, match=r"c.jsonl:2: not valid UTF-8 \(byte 0xff"):
        evaluate.main(["--completions", str(tmp_path / "c.jsonl")])
    with pytest.raises(SystemExit, match=r"c.jsonl:2: not valid UTF-8"):
        evaluate.main(["--compare", str(tmp_path / "c.jsonl"), str(tmp_path / "c.jsonl")])


def test_interrupted_scoring_keeps_its_lines_and_resumes(tmp_path, monkeypatch, capsys):
    _, whole = run_completions(tmp_path, capsys, monkeypatch)  # the uninterrupted run: o.json, ps.jsonl
    monkeypatch.setattr(evaluate, "SCORE_CHUNK", 2)
    src, ps = tmp_path / "c.jsonl", tmp_path / "part.jsonl"
    argv = ["--completions", str(src), "--per-sample", str(ps), "--out", str(tmp_path / "r.json")]
    use_judge(monkeypatch, CountingJudge(interrupt_at=2))  # the second chunk is interrupted
    code, _, err = exit_code(argv, capsys)
    assert code == 130 and len(ps.read_text().splitlines()) == 2
    assert err.strip().splitlines() == [f"eval.py: interrupted: 2 completions are in {ps}; "
                                        "run the same command with --resume to score the rest"]
    with pytest.raises(SystemExit, match="part.jsonl already has 2 lines: pass --resume"):
        evaluate.main(argv)  # never overwritten by accident
    with pytest.raises(SystemExit, match=r"part.jsonl:\d: prompt_id \w+, sample 0 is not a completion of this run"):
        evaluate.main(argv + ["--resume", "--limit", "1"])  # one prompt drawn: the other line is foreign
    use_judge(monkeypatch, CountingJudge(interrupt_at=1))
    code, _, err = exit_code(argv[:2], capsys)
    assert code == 130 and err.startswith("eval.py: interrupted: nothing kept (no --per-sample)")
    with open(ps, "a") as f:
        f.write('{"prompt_id": "cut off by a')  # a kill mid-write leaves a partial line
    judge = use_judge(monkeypatch, CountingJudge())
    evaluate.main(argv + ["--resume"])
    assert judge.asked == ["What is 3 * 4?", "Write a haiku."]  # only the unscored completions
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == whole
    assert ps.read_text() == (tmp_path / "ps.jsonl").read_text()
    with pytest.raises(SystemExit, match="--resume needs --per-sample"):
        evaluate.main(argv[:2] + ["--resume"])


def test_ctrl_c_while_the_judge_hangs_exits_130_at_once_keeping_what_is_scored(tmp_path):
    """The judge server never answers: the first Ctrl-C must not wait out the attempts and backoff sleeps
    (4 x 10 s here), only cancel them, keep the chunk already scored and exit 130 as any interrupt does."""
    # A first chunk (eval.SCORE_CHUNK) the rule judge scores without a request, then one the LLM must judge.
    rule = [(record("math-hard", f"What is {i} + 1?", str(i + 1)), completion("DQ_DA", f"\\boxed{{{i + 1}}}"))
            for i in range(evaluate.SCORE_CHUNK)]
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": r, "completion": c} for r, c in rule + [FIXTURE[3]]])
    ps = tmp_path / "ps.jsonl"
    server = FakeJudgeServer(lambda payload, n: ("hang", None))   # serves test-model
    try:
        with running([sys.executable, "eval.py", "--completions", str(src), "--per-sample", str(ps), "--judge",
                      server.url + "#test-model", "--judge-timeout", "10"], cwd=ROOT, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True) as proc:
            start = time.monotonic()
            while server.requests == 0 and proc.poll() is None and time.monotonic() - start < 60:
                time.sleep(0.05)
            assert server.requests, proc.communicate()[1]
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            try:
                _, err = proc.communicate(timeout=3)
            except subprocess.TimeoutExpired:
                pytest.fail("eval.py still runs 3 s after Ctrl-C: it waits for the hanging judge")
            assert proc.returncode == 130 and time.monotonic() - sent < 3, err
    finally:
        server.close()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"eval.py: interrupted: {evaluate.SCORE_CHUNK} completions are in {ps}; "
                                            "run the same command with --resume to score the rest")
    lines = [json.loads(l) for l in ps.read_text().splitlines()]
    assert len(lines) == evaluate.SCORE_CHUNK and all(l["data_source"] == "math-hard" for l in lines)


def test_model_path_writes_as_it_goes_and_resumes_whole_prompts(tiny_run, tmp_path, monkeypatch, capsys):
    d, model, data = tiny_run
    ps = tmp_path / "ps.jsonl"
    argv = ["--model", str(model), "--data", str(data), "--max-new-tokens", "4", "--batch-size", "1",
            "--num-samples", "2", "--per-sample", str(ps)]
    evaluate.main(argv[:-1] + [str(tmp_path / "whole.jsonl")])
    whole = (tmp_path / "whole.jsonl").read_text().splitlines()
    generated = []
    real = evaluate.generate_completions

    def spy(model, tokenizer, prompts, order, *a, **kw):
        if len(generated) == 2:
            raise KeyboardInterrupt
        generated.append(list(order))
        return real(model, tokenizer, prompts, order, *a, **kw)

    monkeypatch.setattr(evaluate, "generate_completions", spy)
    monkeypatch.setattr(evaluate, "SCORE_CHUNK", 2)  # one prompt (2 samples) per generate-and-score round
    code, _, err = exit_code(argv, capsys)
    assert code == 130 and "interrupted: 4 completions are in" in err
    lines = ps.read_text().splitlines()
    kept = [l for l in lines if not json.loads(l).get("pending")]
    assert len(lines) == 8  # each completion was written once generated, then once scored
    assert len(kept) == 4 and sorted(kept) == sorted(l for l in whole if json.loads(l)["prompt_id"] in
                                                     {json.loads(k)["prompt_id"] for k in kept})
    ps.write_text("\n".join(kept[:3]) + "\n")  # the second prompt has one sample left: generated again
    generated.clear()
    evaluate.main(argv + ["--resume"])
    assert sorted(i for o in generated for i in o) == [i for i in range(3) if whole[2 * i] not in kept[:2]]
    assert ps.read_text().splitlines() == whole  # greedy: the same lines, in record order


# -----------------------------------------------------------------------------
# a run on a real mix: --limit stratified, unscorable sources, --compare per source, completions kept

def test_rule_judge_refuses_unscorable_sources_before_anything(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": r, "completion": c} for r, c in FIXTURE])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--completions", str(src), "--per-sample", str(tmp_path / "ps.jsonl")])
    assert str(e.value) == ("eval.py: the rule judge cannot score data_source medium; pass --judge "
                            "http://HOST:PORT/v1 (an OpenAI-compatible server), or --skip-unscorable to score "
                            "only arith_demo, math-hard")
    assert not (tmp_path / "ps.jsonl").exists()


def test_skip_unscorable_scores_the_rest_and_says_what_overall_covers(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": r, "completion": c} for r, c in FIXTURE])
    evaluate.main(["--completions", str(src), "--skip-unscorable", "--out", str(tmp_path / "o.json")])
    out = capsys.readouterr().out
    o = json.loads((tmp_path / "o.json").read_text())
    assert o["n_samples"] == 4 and set(o["metrics"]) == {"arith_demo", "math-hard", "overall"}
    assert o["skipped_sources"] == {"medium": 1}
    assert "--skip-unscorable: left out medium (1 completion): the rule judge cannot score it" in out
    rows = [l.split()[:3] for l in out.splitlines()]
    assert ["overall", "(arith_demo,", "math-hard)"] in rows  # the overall rows say what they cover
    assert o["metrics"]["overall"]["judge_failure_rate"] == 0.0
    only_medium = write_jsonl(tmp_path / "m.jsonl", [{"record": FIXTURE[3][0], "completion": FIXTURE[3][1]}])
    with pytest.raises(SystemExit, match="--skip-unscorable left nothing: the rule judge cannot score medium"):
        evaluate.main(["--completions", str(only_medium), "--skip-unscorable"])


def mix_records(n_math=8, n_minerva=3, n_arith=1):
    return ([record("math-hard", f"What is {i} + {i}?", str(2 * i)) for i in range(n_math)]
            + [record("minerva", f"What is {i} * 3?", str(3 * i)) for i in range(n_minerva)]
            + [record("arith_demo", "What is 1 + 1?", "2")][:n_arith])


def test_limit_draws_a_stratified_seeded_subset(tiny_run, tmp_path, capsys):
    from nano_gtalign.data import stratified_subset
    _, model, _ = tiny_run
    records = mix_records()
    data = write_jsonl(tmp_path / "mix.jsonl", records)
    argv = ["--model", str(model), "--data", str(data), "--limit", "4", "--max-new-tokens", "2"]
    evaluate.main(argv + ["--per-sample", str(tmp_path / "a.jsonl")])
    out = capsys.readouterr().out
    got = [json.loads(l)["record"] for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert got == stratified_subset(records, 4, seed=0)
    assert sorted(r["data_source"] for r in got) == ["arith_demo", "math-hard", "math-hard", "minerva"]
    assert got != records[:4]  # not the first four (all math-hard)
    assert "--limit 4: 4 of 12 records, drawn per data_source (--limit-seed 0): arith_demo 1, math-hard 2, minerva 1" in out
    evaluate.main(argv + ["--per-sample", str(tmp_path / "b.jsonl"), "--limit-seed", "1"])
    other = [json.loads(l)["record"] for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert other == stratified_subset(records, 4, seed=1) != got
    # --completions: whole prompts are drawn, every sample of a drawn prompt kept
    lines = [{"record": r, "completion": "x", "sample": s} for r in records for s in range(2)]
    evaluate.main(["--completions", str(write_jsonl(tmp_path / "c.jsonl", lines)), "--limit", "4",
                   "--out", str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text())["n_samples"] == 8


def test_compare_prints_what_applies_and_each_source(tmp_path, capsys, monkeypatch):
    run_completions(tmp_path, capsys, monkeypatch)
    ps = [json.loads(l) for l in (tmp_path / "ps.jsonl").read_text().splitlines()]
    b = [dict(r) for r in ps]
    b[0]["user"] += 0.1   # arith_demo: b better on one prompt
    b[2]["llm"] -= 0.1    # math-hard: b worse on one prompt
    write_jsonl(tmp_path / "b.jsonl", b)
    capsys.readouterr()
    evaluate.main(["--compare", str(tmp_path / "ps.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    config = out.splitlines()[0]
    assert config.startswith("config: compare=") and "eps=0.01" in config
    assert "model=" not in config and "judge=" not in config and "temperature=" not in config
    c = json.loads((tmp_path / "c.json").read_text())["compare_by_source"]
    assert set(c) == {"arith_demo", "math-hard", "medium", "overall"}
    assert c["arith_demo"]["dominance"] == {"a_dominates_b": 0, "b_dominates_a": 1, "equal": 1, "incomparable": 0}
    assert c["math-hard"]["dominance"] == {"a_dominates_b": 1, "b_dominates_a": 0, "equal": 1, "incomparable": 0}
    assert c["medium"]["n_matched"] == 0  # its judgement failed in both runs: no point to compare
    assert c["overall"]["n_matched"] == 4
    table = {l.split()[0]: l.split()[1:] for l in out[out.index("per source"):].splitlines()[2:]}
    assert table["arith_demo"][:5] == ["2", "0", "1", "1", "0"]
    assert table["math-hard"][:5] == ["2", "1", "0", "1", "0"]
    assert table["medium"][:5] == ["0", "0", "0", "0", "0"] and set(table["medium"][5:]) == {"-"}
    assert table["overall"][:5] == ["4", "1", "1", "2", "0"]


def test_completions_are_kept_before_scoring(tiny_run, tmp_path, monkeypatch, capsys):
    """A scoring that fails (a judge that raises) loses no generation: --per-sample already holds the
    completions, which --completions scores, or --resume scores without generating them again."""
    d, model, data = tiny_run
    argv = ["--model", str(model), "--data", str(data), "--max-new-tokens", "4", "--num-samples", "2",
            "--temperature", "0"]
    evaluate.main(argv + ["--per-sample", str(tmp_path / "whole.jsonl"), "--out", str(tmp_path / "whole.json")])
    whole = (tmp_path / "whole.jsonl").read_text()
    real = evaluate.score_completions

    def exploding(*a, **kw):
        raise RuntimeError("judge exploded")

    monkeypatch.setattr(evaluate, "score_completions", exploding)
    ps = tmp_path / "ps.jsonl"
    with pytest.raises(RuntimeError, match="judge exploded"):
        evaluate.main(argv + ["--per-sample", str(ps)])
    kept = [json.loads(l) for l in ps.read_text().splitlines()]
    assert len(kept) == 6 and all(k["pending"] and k["completion"] and k["record"] for k in kept)
    monkeypatch.setattr(evaluate, "score_completions", real)
    evaluate.main(["--completions", str(ps), "--tokenizer", str(model), "--out", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["n_samples"] == 6
    assert again["metrics"]["overall"]["format_rate"] == json.loads((tmp_path / "whole.json").read_text())[
        "metrics"]["overall"]["format_rate"]

    def no_generation(*a, **kw):
        raise AssertionError("--resume generated again what the file holds")

    monkeypatch.setattr(evaluate, "generate_completions", no_generation)
    evaluate.main(argv + ["--per-sample", str(ps), "--resume"])
    assert ps.read_text() == whole  # scored, in record order, the pending lines gone


# -----------------------------------------------------------------------------
# every input line and every numeric flag: one line naming the file and line (or the flag), never a traceback

GOOD_RECORD = record("math-hard", "What is 3 * 4?", "12")


def splice(obj: dict, field: str, raw: str) -> str:
    """obj as a JSON line with a top-level or record-level field replaced by raw JSON text."""
    line = json.dumps({**obj, field: "@@RAW@@"}) if field in obj or "." not in field else None
    if line is None:  # "record.reward_model": inside the record
        outer, inner = field.split(".")
        line = json.dumps({**obj, outer: {**obj[outer], inner: "@@RAW@@"}})
    return line.replace('"@@RAW@@"', raw)


DEEP_JSON = "[" * 100_000 + "]" * 100_000
PROBE = {"reward_model is a list": ("reward_model", "[1]", "reward_model must be an object with a ground_truth, got list"),
         "a 5,000-digit integer": ("index", "9" * 5000, "an integer of more than 4300 digits"),
         "100,000-deep nesting": ("extra", DEEP_JSON, "nested more than 64 levels deep")}


@pytest.mark.parametrize("bad", PROBE)
@pytest.mark.parametrize("where", ["--data", "--completions", "--per-sample --resume", "--compare"])
def test_every_input_file_refuses_a_bad_line_in_one_line(tiny_run, tmp_path, monkeypatch, where, bad):
    field, raw, words = PROBE[bad]
    _, model, data = tiny_run
    monkeypatch.chdir(tmp_path)
    judge = use_judge(monkeypatch, CountingJudge())
    ps = tmp_path / "ps.jsonl"
    if where == "--data":
        path = tmp_path / "d.jsonl"
        line = splice(GOOD_RECORD, "reward_model" if field == "reward_model" else field, raw)
        path.write_text(json.dumps(GOOD_RECORD) + "\n" + line + "\n")
        argv = ["--model", str(model), "--data", str(path)]
    else:
        evaluate.main(["--model", str(model), "--data", str(data), "--max-new-tokens", "2", "--per-sample", str(ps)])
        lines = ps.read_text().splitlines()
        first = json.loads(lines[0])
        inner = "record.reward_model" if field == "reward_model" else field
        bad_line = splice(first, inner, raw)
        path = ps if where.startswith("--per-sample") else tmp_path / "c.jsonl"
        path.write_text(lines[1] + "\n" + bad_line + "\n")
        argv = {"--completions": ["--completions", str(path)],
                "--per-sample --resume": ["--model", str(model), "--data", str(data), "--max-new-tokens", "2",
                                          "--per-sample", str(ps), "--resume"],
                "--compare": ["--compare", str(path), str(path)]}[where]
        if where == "--compare" and field == "reward_model":
            words = "reward_model must be an object"  # --compare reads the row's own fields; the record is checked too
    judge.calls = 0
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    msg = str(e.value)
    assert msg.startswith(f"eval.py: {path}:2: ") and words in msg and "\n" not in msg, msg
    assert judge.calls == 0


@pytest.mark.parametrize("change,words", [
    (lambda r: r.update(prompt_id=["x"]), "prompt_id must be a string, got list"),
    (lambda r: r.update(sample="0"), "sample must be an integer >= 0, got str"),
    (lambda r: r.update(sample=-1), "sample must be an integer >= 0, got -1"),
    (lambda r: r.update(user="high"), "user must be a number or null, got str"),
    (lambda r: r.update(judge_failed="no"), "judge_failed must be true or false, got str"),
    (lambda r: r.update(data_source=7), "data_source must be a string, got int"),
    (lambda r: r.update(generation=[1]), "generation must be an object, got list"),
    (lambda r: r.pop("llm"), "not an eval.py --per-sample line (missing llm)"),
])
def test_per_sample_lines_are_checked_by_type_on_resume_and_compare(tmp_path, capsys, monkeypatch, change, words):
    run_completions(tmp_path, capsys, monkeypatch)
    ps = tmp_path / "ps.jsonl"
    lines = [json.loads(l) for l in ps.read_text().splitlines()]
    change(lines[2])
    write_jsonl(ps, lines)
    for argv in (["--completions", str(tmp_path / "c.jsonl"), "--per-sample", str(ps), "--resume"],
                 ["--compare", str(ps), str(ps)]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert str(e.value) == f"eval.py: {ps}:3: {words}"


NUMERIC_FLAGS = [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--top-k", "-3"], "--top-k must be >= 0, got -3"),
    (["--eps", "-0.1"], "--eps must be a finite number >= 0, got -0.1"),
    (["--eps", "inf"], "--eps must be a finite number >= 0, got inf"),
    (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
    (["--seed", str(2 ** 32)], f"--seed must be in [0, 2^32), got {2 ** 32}"),
    (["--limit-seed", "-1"], "--limit-seed must be in [0, 2^32), got -1"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--num-samples", "-2"], "--num-samples must be >= 1, got -2"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
]


@pytest.mark.parametrize("argv,message", NUMERIC_FLAGS, ids=[" ".join(a) for a, _ in NUMERIC_FLAGS])
def test_every_numeric_flag_is_range_checked_before_anything_else(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # no model, no data: the flag is what is refused, first
    for mode in ([], ["--completions", "c.jsonl"], ["--compare", "a.jsonl", "b.jsonl"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(mode + argv)
        assert str(e.value) == f"eval.py: {message}"


def test_the_range_table_covers_every_numeric_flag():
    numeric = {a.dest for a in evaluate.build_parser()._actions if a.type in (int, float)}
    assert numeric == set(evaluate.FLAG_RANGES)
    for name, (ok, _) in evaluate.FLAG_RANGES.items():  # every default is in its own range
        default = evaluate.build_parser().get_default(name)
        assert default is None or ok(default), name


# -----------------------------------------------------------------------------
# --per-sample lines say what generated them; --resume refuses a file another model or setting wrote

def test_resume_refuses_another_model_tokenizer_or_setting(tiny_run, tmp_path, capsys):
    import shutil
    _, model, data = tiny_run
    ps = tmp_path / "ps.jsonl"
    argv = ["--model", str(model), "--data", str(data), "--max-new-tokens", "4", "--num-samples", "2",
            "--per-sample", str(ps), "--out", str(tmp_path / "o.json")]
    evaluate.main(argv)
    whole = ps.read_text().splitlines()
    gen = json.loads(whole[0])["generation"]
    assert {k: gen[k] for k in ("model", "max_new_tokens", "temperature", "top_p", "top_k", "num_samples", "seed",
                                "dtype")} == {"model": str(model), "max_new_tokens": 4, "temperature": 0.0,
                                              "top_p": 1.0, "top_k": 0, "num_samples": 2, "seed": 0, "dtype": "auto"}
    assert len(gen["weights"]) == len(gen["tokenizer"]) == 16
    assert all(json.loads(l)["generation"] == gen for l in whole)
    assert json.loads((tmp_path / "o.json").read_text())["generation"] == gen
    ps.write_text("\n".join(whole[:2]) + "\n")  # an interrupted run: the first prompt done
    other = make_hf_model(tmp_path / "other", seed=1)
    retok = Path(shutil.copytree(model, tmp_path / "retok"))
    config = json.loads((retok / "tokenizer_config.json").read_text())
    (retok / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": config["pad_token"]}))
    again = "--resume needs the same model, tokenizer and generation settings"
    for extra, words in [
        (["--model", str(other)], f"was generated by the model at {model} (weights {gen['weights']}), this run's "
                                  f"by the model at {other} (weights "),
        (["--model", str(retok)], f"was generated with the tokenizer {gen['tokenizer']} (of {model}), this run's "
                                  f"with the tokenizer "),
        (["--temperature", "0.5"], "was generated with --temperature 0.0, this run's with --temperature 0.5"),
        (["--top-p", "0.9"], "was generated with --top-p 1.0, this run's with --top-p 0.9"),
        (["--top-k", "5"], "was generated with --top-k 0, this run's with --top-k 5"),
        (["--seed", "3"], "was generated with --seed 0, this run's with --seed 3"),
        (["--max-new-tokens", "5"], "was generated with --max-new-tokens 4, this run's with --max-new-tokens 5"),
        (["--num-samples", "3"], "was generated with --num-samples 2, this run's with --num-samples 3"),
        (["--dtype", "float32"], "was generated with --dtype auto, this run's with --dtype float32"),
    ]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + extra + ["--resume"])
        msg = str(e.value)
        assert msg.startswith(f"eval.py: {ps}:1: its completion ") and words in msg and again in msg, msg
        assert "\n" not in msg
        assert ps.read_text().splitlines() == whole[:2]  # refused before anything was written
    # the same checkpoint elsewhere is the same model: the resume goes on
    moved = Path(shutil.copytree(model, tmp_path / "moved"))
    evaluate.main(argv + ["--model", str(moved), "--resume"])
    done = [json.loads(l) for l in ps.read_text().splitlines()]
    assert [{**d, "generation": None} for d in done] == [{**json.loads(l), "generation": None} for l in whole]
    assert [d["generation"]["model"] for d in done] == [str(model)] * 2 + [str(moved)] * 4


def test_resume_reads_a_file_from_before_the_generation_field(tiny_run, tmp_path, capsys):
    _, model, data = tiny_run
    ps = tmp_path / "ps.jsonl"
    argv = ["--model", str(model), "--data", str(data), "--max-new-tokens", "3", "--per-sample", str(ps)]
    evaluate.main(argv)
    whole = ps.read_text().splitlines()
    old = [{k: v for k, v in json.loads(l).items() if k != "generation"} for l in whole[:2]]
    write_jsonl(ps, old)
    capsys.readouterr()
    evaluate.main(argv + ["--resume"])
    out = capsys.readouterr().out
    assert f"--resume: 2 lines of {ps} do not say what generated them (an older eval.py wrote them): not checked" in out
    assert [json.loads(l) for l in ps.read_text().splitlines()] == old + [json.loads(l) for l in whole[2:]]


def test_completions_keep_what_generated_them_and_resume_checks_it(tiny_run, tmp_path, capsys):
    _, model, data = tiny_run
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["--model", str(model), "--data", str(data), "--max-new-tokens", "3"]
    evaluate.main(common + ["--per-sample", str(a)])
    evaluate.main(common + ["--per-sample", str(b), "--temperature", "1.0", "--seed", "5"])
    gen_a = json.loads(a.read_text().splitlines()[0])["generation"]
    ps = tmp_path / "ps.jsonl"
    evaluate.main(["--completions", str(a), "--per-sample", str(ps)])
    rescored = ps.read_text().splitlines()
    assert all(json.loads(l)["generation"] == gen_a for l in rescored)  # re-scoring keeps the provenance
    ps.write_text(rescored[0] + "\n")
    with pytest.raises(SystemExit) as e:  # b's completions of the same prompts are not a's
        evaluate.main(["--completions", str(b), "--per-sample", str(ps), "--resume"])
    assert str(e.value).startswith(f"eval.py: {ps}:1: its completion was generated with --temperature 0.0, this "
                                   "run's with --temperature 1.0")
    evaluate.main(["--completions", str(a), "--per-sample", str(ps), "--resume"])
    assert ps.read_text().splitlines() == rescored


def test_the_judge_url_is_printed_and_stored_without_its_password(tiny_run, tmp_path, monkeypatch, capsys):
    _, model, data = tiny_run
    use_judge(monkeypatch, CountingJudge())
    url = "http://alice:s3cret@127.0.0.1:9/v1#Qwen/Qwen3-32B"
    src = write_jsonl(tmp_path / "c.jsonl", [{"record": FIXTURE[0][0], "completion": FIXTURE[0][1]}])
    for argv in (["--completions", str(src)], ["--model", str(model), "--data", str(data), "--max-new-tokens", "2"]):
        evaluate.main(argv + ["--judge", url, "--out", str(tmp_path / "o.json"), "--per-sample", str(tmp_path / "ps.jsonl")])
        out, err = capsys.readouterr()
        written = (tmp_path / "o.json").read_text() + (tmp_path / "ps.jsonl").read_text()
        assert "s3cret" not in out + err + written
        assert "judge='http://***@127.0.0.1:9/v1#Qwen/Qwen3-32B'" in out.splitlines()[0]
        assert json.loads((tmp_path / "o.json").read_text())["config"]["judge"] == "http://***@127.0.0.1:9/v1#Qwen/Qwen3-32B"
        (tmp_path / "ps.jsonl").unlink()


def test_max_new_tokens_past_the_context_is_refused_before_the_judge_or_the_weights(tiny_run, monkeypatch):
    _, model, data = tiny_run
    judge = use_judge(monkeypatch, CountingJudge())
    monkeypatch.setattr(evaluate, "load_pretrained", lambda *a, **kw: pytest.fail("the weights were loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(model), "--data", str(data), "--max-new-tokens", "600"])
    assert re.fullmatch(r"eval.py: the longest prompt \(\d+ tokens\) \+ --max-new-tokens 600 exceeds the model's "
                        r"max_position_embeddings \(512\); lower --max-new-tokens", str(e.value)), str(e.value)
    assert judge.calls == 0
