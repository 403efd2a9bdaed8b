"""sample.py end to end in a subprocess: --json output equals the library's greedy generation,
plain output prints the text, and a missing model directory is a clear one-line error."""
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
