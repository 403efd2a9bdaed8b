"""sample.py end to end in a subprocess: --json output equals the library's greedy generation,
plain output prints the text, a missing model directory is a clear one-line error, and a bad checkpoint
(its chat template included) is one line naming the file, with exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nano_gtalign.loader import load_pretrained, load_tokenizer
from nano_gtalign.sampling import SamplingParams, generate
from tiny import make_hf_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_sample(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny model: one thread is fastest
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("cli_model"), arch="qwen2")


def test_json_output_matches_library_greedy(model_dir):
    proc = run_sample("--model", str(model_dir), "--prompt", "What is 37 + 48?", "--system", "Be brief.",
                      "--temperature", "0", "--max-new-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout holds the JSON object only; config went to stderr
    assert "config:" in proc.stderr and "config:" not in proc.stdout

    model, tok = load_pretrained(model_dir), load_tokenizer(model_dir)
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 37 + 48?"}])
    gen = generate(model, tok, [ids], SamplingParams(max_new_tokens=10, temperature=0.0))
    n = int(gen.completion_mask[0].sum())
    assert out["prompt_token_ids"] == ids
    assert out["token_ids"] == gen.completion_ids[0, :n].tolist()
    assert out["text"] == gen.texts[0]
    assert out["finish_reason"] == gen.finish_reasons[0]
    assert out["logprobs"] == pytest.approx(gen.logprobs[0, :n].tolist(), abs=1e-5)


def test_plain_output_prints_config_then_text(model_dir):
    proc = run_sample("--model", str(model_dir), "--prompt", "Hello", "--raw", "--temperature", "0.8",
                      "--seed", "1", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("config: ") and "temperature=0.8" in lines[0] and "raw=True" in lines[0]
    assert lines[-1].startswith("[") and "finish_reason=" in lines[-1]


def test_missing_model_dir_is_a_clear_error(tmp_path):
    # Run from an empty directory so the default out/demo/final is certainly missing.
    proc = run_sample("--prompt", "Hi", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no model directory at out/demo/final" in proc.stderr and "python train.py" in proc.stderr
    proc = run_sample("--model", str(tmp_path / "nope"), "--prompt", "Hi")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"no model directory at {tmp_path / 'nope'}" in proc.stderr


def test_bad_sampling_option_is_a_clear_error(model_dir):
    proc = run_sample("--model", str(model_dir), "--prompt", "Hi", "--top-p", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "top_p must be in (0, 1]" in proc.stderr


def test_help_lists_the_choice_rules():
    proc = run_sample("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--rule {cobb_douglas,sum,product}" in proc.stdout and "upstream's largest raw LLM x user" in proc.stdout
    proc = run_sample("--prompt", "Hi", "--price", "none", "--rule", "nash")
    assert proc.returncode == 2 and "invalid choice: 'nash'" in proc.stderr


# ---------------------------------------------------------------- --record FILE:N

def write_records(path: Path) -> Path:
    records = [{"prompt": [{"role": "system", "content": f"System {i}."}, {"role": "user", "content": f"What is {i} + 1?"}],
                "data_source": "math-hard", "reward_model": {"ground_truth": str(i + 1)}} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # a blank line is not a record
    return path


def test_record_is_sampled_with_its_own_messages(model_dir, tmp_path):
    data = write_records(tmp_path / "test.jsonl")
    proc = run_sample("--model", str(model_dir), "--record", f"{data}:2", "--temperature", "0",
                      "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(model_dir)
    messages = [{"role": "system", "content": "System 1."}, {"role": "user", "content": "What is 1 + 1?"}]
    assert json.loads(proc.stdout)["prompt_token_ids"] == tok.encode_chat(messages)  # N counts from 1
    assert f"record 2 of {data} (data_source math-hard, 2 messages)" in proc.stderr


def test_bad_record_is_one_line(model_dir, tmp_path):
    data = write_records(tmp_path / "test.jsonl")
    cases = [(f"{data}:4", f"--record {data}:4: the file has 3 records (N counts from 1)"),
             (f"{data}:0", f"--record {data}:0: the file has 3 records (N counts from 1)"),
             (f"{data}:two", f"--record {data}:two: N must be a whole number (FILE:N, N counts from 1)"),
             (str(data), f"--record {data}: give FILE:N, e.g. {data}:1"),
             (f"{tmp_path / 'nope.jsonl'}:1", f"{tmp_path / 'nope.jsonl'}: no such file")]
    for spec, message in cases:
        proc = run_sample("--model", str(model_dir), "--record", spec)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"sample.py: {message}"
    for extra, message in [(["--prompt", "Hi"], "give --prompt or --record, not both"),
                           (["--system", "Be brief."], "--system: a --record brings its own messages"),
                           (["--raw"], "--raw: a --record is sent through the chat template"),
                           (["--price", "none", "--game-prompt", "full"],
                            "--game-prompt applies to --prompt; a --record is sent as training saw it")]:
        proc = run_sample("--model", str(model_dir), "--record", f"{data}:1", *extra)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"sample.py: {message}"
    proc = run_sample("--model", str(model_dir))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        "sample.py: give --prompt TEXT or --record FILE:N"


def test_price_says_which_system_prompt_it_uses(model_dir, tmp_path):
    common = ["--model", str(model_dir), "--price", "none", "--temperature", "0", "--max-new-tokens", "3", "--json"]
    proc = run_sample(*common, "--prompt", "Add 5 to my number.")
    assert proc.returncode == 0, proc.stderr
    assert "--game-prompt demo: the system message is the demo's arithmetic instruction" in proc.stderr
    from data.demo.task import DEMO_SYSTEM_PROMPT
    assert json.loads(proc.stdout)["messages"][0] == {"role": "system", "content": DEMO_SYSTEM_PROMPT}
    proc = run_sample(*common, "--prompt", "Add 5 to my number.", "--system", "Mine.")
    assert "--game-prompt demo:" not in proc.stderr and json.loads(proc.stdout)["messages"][0]["content"] == "Mine."
    data = write_records(tmp_path / "test.jsonl")
    proc = run_sample(*common, "--record", f"{data}:3")
    assert proc.returncode == 0, proc.stderr
    assert "--game-prompt demo:" not in proc.stderr
    assert json.loads(proc.stdout)["messages"] == [{"role": "system", "content": "System 2."},
                                                   {"role": "user", "content": "What is 2 + 1?"}]


# ---------------------------------------------------------------- a bad checkpoint: one line, exit 2

def broken_copy(model_dir, tmp_path, fault: str) -> tuple[Path, str]:
    """A copy of the model with one fault, and the file the error line must name."""
    import shutil
    path = Path(shutil.copytree(model_dir, tmp_path / "m"))
    if fault == "sandbox_escape":  # refused by jinja2's sandbox when rendered
        (path / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.popen('id').read() }}")
        return path, "chat_template.jinja"
    if fault == "template_raises":
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{{ raise_exception('system messages are not supported') }}"
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
        return path, "tokenizer_config.json"
    if fault == "template_syntax":
        (path / "chat_template.jinja").write_text("{% for m in messages %}")
        return path, "chat_template.jinja"
    if fault == "tokenizer_json":
        (path / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        return path, "tokenizer.json"
    if fault == "zero_heads":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
        return path, "config.json"
    if fault == "nan_weight":
        from safetensors.torch import load_file, save_file
        state = load_file(path / "model.safetensors")
        state["lm_head.weight"][4, 2] = float("nan")
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return path, "model.safetensors"
    raise ValueError(fault)


# Load-time faults with --prompt; the template's render-time faults also with --record and --price, which
# render the chat template elsewhere in sample.py (and in steering.steer).
BAD_CHECKPOINTS = [("prompt", fault) for fault in ("sandbox_escape", "template_raises", "template_syntax",
                                                   "tokenizer_json", "zero_heads", "nan_weight")] + \
    [(how, fault) for how in ("record", "price") for fault in ("sandbox_escape", "template_raises")]


@pytest.mark.parametrize("how, fault", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line_and_exit_2(model_dir, tmp_path, fault, how):
    path, file = broken_copy(model_dir, tmp_path, fault)
    args = {"prompt": ["--prompt", "Hi"], "record": ["--record", f"{write_records(tmp_path / 'r.jsonl')}:1"],
            "price": ["--prompt", "Hi", "--price", "none"]}[how]
    proc = run_sample("--model", str(path), *args, "--temperature", "0", "--max-new-tokens", "3")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: ") and str(path / file) in last, proc.stderr
    assert "finish_reason" not in proc.stdout and "response (" not in proc.stdout  # nothing was generated
