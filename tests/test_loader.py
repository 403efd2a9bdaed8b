"""Loader: HF model directories in and out, and a one-line CheckpointError naming the file for every bad input
(unreadable files, impossible config.json values, shards outside the directory, NaN/inf weights included);
saved files get normal modes. Also data.read_records' encoding errors.

Run: python -m pytest tests/test_loader.py -q
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nano_gtalign.loader as loader
from nano_gtalign.loader import CheckpointError, load_pretrained, load_tokenizer, save_pretrained
from nano_gtalign.model import rope_inv_freq
from tests.tiny import make_hf_model

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[5, 17, 33, 2, 48, 9, 120, 7]])
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "qwen2": make_hf_model(root / "qwen2", "qwen2"),
        "qwen2_sharded": make_hf_model(root / "qwen2_sharded", "qwen2", max_shard_size="60KB"),
        "qwen3_tied": make_hf_model(root / "qwen3_tied", "qwen3", tie_word_embeddings=True),
        "qwen2_bf16": make_hf_model(root / "qwen2_bf16", "qwen2", dtype="bfloat16"),
        # Llama 3.1-style rope_scaling with an original context of 16, and a Llama with every bias.
        "llama3_tied": make_hf_model(root / "llama3_tied", "llama", tie_word_embeddings=True, rope_theta=5e5,
                                     max_position_embeddings=128, rope_scaling=LLAMA3_ROPE),
        "llama_bias": make_hf_model(root / "llama_bias", "llama", attention_bias=True, mlp_bias=True),
    }


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def logits(model):
    with torch.no_grad():
        return model(IDS)


# ---------------------------------------------------------------- loading

def test_sharded_checkpoint_equals_single_file(dirs):
    sharded = dirs["qwen2_sharded"]
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    assert torch.equal(logits(load_pretrained(sharded)), logits(load_pretrained(dirs["qwen2"])))


def test_built_on_meta_then_materialised(dirs, monkeypatch):
    built_on = []
    real = loader.Transformer

    def recording(config):
        m = real(config)
        built_on.append(next(m.parameters()).device.type)
        return m

    monkeypatch.setattr(loader, "Transformer", recording)
    model = load_pretrained(dirs["qwen3_tied"])
    assert built_on == ["meta"]
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model.inv_freq, rope_inv_freq(model.config), rtol=0, atol=0)
    assert not model.training
    with safe_open(str(dirs["qwen3_tied"] / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(model.model.norm.weight, f.get_tensor("model.norm.weight"), rtol=0, atol=0)


def test_dtype_choice(dirs):
    assert load_pretrained(dirs["qwen2_bf16"]).output_weight().dtype == torch.bfloat16  # checkpoint's dtype
    m32 = load_pretrained(dirs["qwen2_bf16"], dtype="float32")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    assert load_pretrained(dirs["qwen2"], dtype=torch.bfloat16).output_weight().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp33'"):
        load_pretrained(dirs["qwen2"], dtype="fp33")


def test_tied_checkpoint_that_also_stores_lm_head(dirs, tmp_path):
    path = copy(dirs["qwen3_tied"], tmp_path / "m")
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(logits(load_pretrained(path)), logits(load_pretrained(dirs["qwen3_tied"])))


# ---------------------------------------------------------------- saving

@pytest.mark.parametrize("name, shard", [("qwen2", None), ("qwen3_tied", 40_000), ("llama_bias", None),
                                         ("llama3_tied", 40_000)])
def test_save_loads_back_in_transformers_and_here(dirs, tmp_path, name, shard):
    model, tok = load_pretrained(dirs[name]), load_tokenizer(dirs[name])
    out = tmp_path / "saved"
    save_pretrained(model, tok, out, **({"max_shard_size": shard} if shard else {}))
    want = logits(model)
    assert (hf_logits(out) - want).abs().max().item() <= 1e-5
    assert torch.equal(logits(load_pretrained(out)), want)

    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2
        assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as transformers does
    else:
        assert "model.safetensors" in files
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" in f.keys()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert load_tokenizer(out).apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary directory left behind


@pytest.mark.parametrize("name", ["llama3_tied", "llama_bias"])
def test_llama_export_is_a_llama_directory(dirs, tmp_path, name):
    # config.json says llama with its rope scaling and biases, so transformers builds the same model: same logits
    # over 100 positions (6x the llama3 variant's original context), and the tokenizer tokenizes the same.
    model, tok = load_pretrained(dirs[name]), load_tokenizer(dirs[name])
    out = tmp_path / "saved"
    save_pretrained(model, tok, out)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (config["attention_bias"], config["mlp_bias"]) == ((False, False) if name == "llama3_tied" else (True, True))
    if name == "llama3_tied":
        assert config["rope_scaling"] == LLAMA3_ROPE and config["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 5e5}
    else:
        assert "rope_scaling" not in config and config["rope_parameters"]["rope_type"] == "default"
    ids = torch.randint(3, 300, (2, 100), generator=torch.Generator().manual_seed(5))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
    assert load_pretrained(out).config == model.config
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "What is 37 + 48? The quick brown fox."
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_save_bf16_without_tokenizer_and_overwrite(dirs, tmp_path):
    model = load_pretrained(dirs["qwen2_bf16"])
    out = tmp_path / "saved"
    save_pretrained(load_pretrained(dirs["qwen2"]), None, out)
    save_pretrained(model, None, out)  # replaces the earlier save
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    again = load_pretrained(out)
    assert again.output_weight().dtype == torch.bfloat16
    assert torch.equal(logits(again), logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_crash_during_save_leaves_no_complete_looking_model(dirs, tmp_path, monkeypatch):
    model, tok = load_pretrained(dirs["qwen2"]), load_tokenizer(dirs["qwen2"])

    def crash(path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tok, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # An existing save stays intact when its replacement fails.
    save_pretrained(model, None, tmp_path / "old")
    before = (tmp_path / "old" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tok, tmp_path / "old")
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before
    assert torch.equal(logits(load_pretrained(tmp_path / "old")), logits(model))


# ---------------------------------------------------------------- exports that round-trip

QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
EXPORT_TEXTS = ["What is 37 + 48? The answer is 85.", "  leading spaces\n\ttab", "ünïcödé 🙂 漢字", "e\u0301 vs é",
                "123456 apples, I'm   here\n\n  ok", "<|im_start|>user\nhi<|im_end|>\n",
                '<thinking>ok</thinking><payoff>{"DQ_DA": {"LLM": 3.1, "user": -0.5}}</payoff> user.</analyze>'
                "<response>The answer is 7.</response>"]
EXPORT_CHATS = [[{"role": "user", "content": "What is 7 + 9?"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 37 to my number."},
                 {"role": "assistant", "content": "<response>Which number?</response>"},
                 {"role": "user", "content": "It is 12 (twelve)."}]]


def qwen_like_tokenizer(path):
    """A tokenizer built as Qwen2.5's is: NFC, Qwen2's split regex, byte-level BPE, and a tokenizer_config.json
    naming Qwen2Tokenizer with an added_tokens_decoder (nothing is downloaded, so this stands in for a real one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tests.tiny import CORPUS, QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS
    path.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + EXPORT_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None, "chat_template": QWEN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}))
    return load_tokenizer(path)


def export_tokenizer(kind, path):
    if kind == "tiny":    # GPT-2's byte-level regex, as tests/tiny.py trains it
        from tests.tiny import make_tokenizer
        return load_tokenizer(make_tokenizer(path))
    if kind == "demo":    # the demo's own pre-tokenizer (data/demo/build.py)
        from data.demo.build import build_tokenizer
        return build_tokenizer(EXPORT_TEXTS * 20 + ["What is 7 + 9?", "Add 5 to my number."] * 20, vocab_size=400)
    return qwen_like_tokenizer(path)


def tiny_model(vocab_size, model_type):
    from nano_gtalign.model import Transformer
    from nano_gtalign.model_config import ModelConfig
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=128, tie_word_embeddings=True, model_type=model_type,
                                   attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
                                   eos_token_id=2, pad_token_id=0))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("kind", ["tiny", "demo", "qwen"])
def test_exported_tokenizer_loads_the_same_in_transformers(tmp_path, kind, model_type):
    """AutoTokenizer on an exported model directory tokenizes exactly as we do. transformers 5 builds every
    qwen2 checkpoint's tokenizer as Qwen2Tokenizer, with Qwen2's own normalizer and pre-tokenizer whatever
    tokenizer.json says; a tokenizer that splits text otherwise must be loaded from tokenizer.json as is."""
    tok = export_tokenizer(kind, tmp_path / "src")
    out = tmp_path / "final"
    save_pretrained(tiny_model(tok.vocab_size, model_type), tok, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    if kind == "qwen":  # a real Qwen tokenizer keeps its own tokenizer_config.json
        assert config["tokenizer_class"] == "Qwen2Tokenizer" and "auto_map" not in config
    for trust in (False, True):  # vLLM and many recipes pass trust_remote_code=True
        hf = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=trust)
        texts = EXPORT_TEXTS + [tok.apply_chat_template(c) for c in EXPORT_CHATS]
        assert [hf.encode(t, add_special_tokens=False) for t in texts] == [tok.encode(t) for t in texts], type(hf)
        assert [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in EXPORT_CHATS] == \
            [tok.apply_chat_template(c) for c in EXPORT_CHATS]
        assert hf.eos_token_id == tok.eos_token_ids[0] and hf.pad_token_id == tok.pad_token_id
    back = load_tokenizer(out)  # and ours reads its own export back unchanged
    assert [back.encode(t) for t in EXPORT_TEXTS] == [tok.encode(t) for t in EXPORT_TEXTS]


def test_export_in_the_input_dtype_with_its_generation_config(dirs, tmp_path):
    """train.py trains in fp32; the export goes back to the input's dtype and keeps its sampling defaults."""
    from nano_gtalign.loader import export_defaults
    src = copy(dirs["qwen2_bf16"], tmp_path / "src")
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": None, "eos_token_id": [2, 0],
                                                            "pad_token_id": 0, **sampling}))
    defaults = export_defaults(src)
    assert defaults.dtype == "bfloat16" and defaults.generation_config["temperature"] == 0.7
    model = load_pretrained(src, dtype=torch.float32)  # as train.py loads it
    out = tmp_path / "final"
    save_pretrained(model, load_tokenizer(src), out, dtype=defaults.dtype, generation_config=defaults.generation_config)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (out / "model.safetensors").stat().st_size < 0.6 * (dirs["qwen2"] / "model.safetensors").stat().st_size
    gen = json.loads((out / "generation_config.json").read_text())
    assert {k: gen[k] for k in sampling} == sampling and gen["eos_token_id"] == [2, 0]
    hf_gen = transformers.GenerationConfig.from_pretrained(out)
    assert (hf_gen.temperature, hf_gen.top_p, hf_gen.top_k, hf_gen.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert torch.equal(logits(load_pretrained(out)), logits(load_pretrained(src)))  # bf16 -> fp32 -> bf16: exact
    assert export_defaults(out) == defaults  # an export of an export keeps them too
    # the default keeps the model's own dtype; an explicit one wins; a bad one is one line
    save_pretrained(model, None, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
    save_pretrained(model, None, tmp_path / "fp16", dtype="float16")
    assert load_pretrained(tmp_path / "fp16").output_weight().dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp33'"):
        save_pretrained(model, None, tmp_path / "bad", dtype="fp33")
    with pytest.raises(ValueError, match="cannot save the weights as int8: not a float dtype"):
        save_pretrained(model, None, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()
    assert export_defaults(dirs["qwen2"]).dtype == "float32"


# ---------------------------------------------------------------- bad input

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", str(tmp_path / "nope"), "does not exist")


def test_missing_or_broken_config(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    (path / "config.json").unlink()
    expect_error(path, str(path / "config.json"), "missing")
    (path / "config.json").write_text("{not json")
    expect_error(path, "config.json", "not valid JSON")


def test_unsupported_architecture(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral",
                                                  "architectures": ["MistralForCausalLM"]}))
    expect_error(path, "config.json", "unsupported model_type 'mistral'")
    # A Qwen2 checkpoint relabelled llama: Llama without attention_bias has no q/k/v bias to put them in.
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    expect_error(path, "model.safetensors", "unexpected weight 'model.layers.0.self_attn.", "_proj.bias'", "llama")


def test_missing_shard(dirs, tmp_path):
    path = copy(dirs["qwen2_sharded"], tmp_path / "m")
    victim = sorted(path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    expect_error(path, victim.name, "shard listed in model.safetensors.index.json is missing")


def test_no_weights(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    (path / "model.safetensors").unlink()
    expect_error(path, "model.safetensors", "no weights")


def test_truncated_safetensors(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    f = path / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    expect_error(path, str(f), "corrupt or truncated safetensors")
    f.write_bytes(b"\x05")  # not even a header length
    expect_error(path, str(f), "corrupt or truncated safetensors")


def rewrite_weights(path, change):
    f = path / "model.safetensors"
    state = load_file(f)
    change(state)
    save_file(state, f, metadata={"format": "pt"})


def test_wrong_shape(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    rewrite_weights(path, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)}))
    expect_error(path, "model.safetensors", "'model.layers.1.mlp.up_proj.weight' has shape (100, 64)",
                 "config.json implies (128, 64)")


def test_missing_and_unexpected_weights(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    rewrite_weights(path, lambda s: s.pop("model.layers.0.self_attn.k_proj.bias"))
    expect_error(path, "model.safetensors", "missing weights ['model.layers.0.self_attn.k_proj.bias']")
    rewrite_weights(path, lambda s: s.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(32),
                                              "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    expect_error(path, "model.safetensors", "unexpected weight 'model.layers.0.self_attn.o_proj.bias'")


def test_missing_tokenizer(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: no such file"):
        load_tokenizer(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------- file modes and permissions

def test_saved_files_are_readable_by_others(dirs, tmp_path):
    # safetensors writes through a private temporary file (mode 0600): other users of a shared
    # checkpoint could not read the weights. Everything is written like a normal file (0666 less the umask).
    model, tok = load_pretrained(dirs["qwen2"]), load_tokenizer(dirs["qwen2"])
    old = os.umask(0o022)
    try:
        save_pretrained(model, tok, tmp_path / "single")
        save_pretrained(model, tok, tmp_path / "sharded", max_shard_size=60_000)
    finally:
        os.umask(old)
    files = list((tmp_path / "single").iterdir()) + list((tmp_path / "sharded").iterdir())
    assert any(f.name.endswith(".safetensors") for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o644) for f in files}
    assert oct((tmp_path / "single").stat().st_mode & 0o777) == oct(0o755)


def deny_reading(monkeypatch, denied: set):
    """Reading the files in `denied` fails as it does for a file of another user with mode 0600: open()
    raises PermissionError, safetensors says "No such file or directory" (root ignores mode bits, so the
    tests cannot chmod)."""
    real_open, real_safe_open = Path.open, loader.safe_open

    def path_open(self, *args, **kwargs):
        if self in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    def safe_open(file, *args, **kwargs):
        if Path(file) in denied:
            raise FileNotFoundError(f"No such file or directory: {file}")
        return real_safe_open(file, *args, **kwargs)

    def from_file(file):
        if Path(file) in denied:
            raise Exception("Permission denied (os error 13)")  # what tokenizers raises: no file name
        return real_from_file(file)

    import tokenizers
    real_from_file = tokenizers.Tokenizer.from_file
    monkeypatch.setattr(Path, "open", path_open)
    monkeypatch.setattr(loader, "safe_open", safe_open)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", from_file)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json",
                                  "model-00002-of-", "tokenizer.json", "tokenizer_config.json"])
def test_permission_denied_is_not_reported_as_missing(dirs, monkeypatch, name):
    path = dirs["qwen2_sharded"] if "-of-" in name or "index" in name else dirs["qwen2"]
    file = next(f for f in sorted(path.iterdir()) if f.name.startswith(name))
    deny_reading(monkeypatch, {file})
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(path) if name.startswith("tokenizer") else load_pretrained(path)
    assert str(info.value) == f"permission denied reading {file}"


@pytest.mark.slow
def test_permission_denied_for_real(dirs, tmp_path):
    """The same with real mode bits: directly when not root, else as root without CAP_DAC_OVERRIDE."""
    path = copy(dirs["qwen2"], tmp_path / "m")
    (path / "model.safetensors").chmod(0)
    script = ("import sys\nfrom nano_gtalign.loader import CheckpointError, load_pretrained\n"
              "try:\n    load_pretrained(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    cmd = [sys.executable, "-c", script, str(path)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root ignores mode bits and setpriv is not available to drop that")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    if res.returncode != 0 and "setpriv" in res.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {res.stderr.strip()}")
    assert res.stdout.strip() == f"permission denied reading {path / 'model.safetensors'}", res.stderr


# ---------------------------------------------------------------- data files (nano_gtalign/data.py)

def test_non_utf8_data_file_names_the_line(tmp_path):
    from nano_gtalign.data import read_records
    from nano_gtalign.errors import UsageError
    record = {"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "data_source": "arith_demo",
              "reward_model": {"ground_truth": "7"}}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(record).encode() + b"\n\n" + b'{"prompt": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(UsageError) as info:
        read_records(bad)
    assert str(info.value).startswith(f"{bad}:3: not valid UTF-8"), str(info.value)
    good = tmp_path / "good.jsonl"
    good.write_bytes(json.dumps(record | {"note": "caf\u00e9 \u2713"}, ensure_ascii=False).encode() + b"\r\n")
    assert read_records(good)[0]["note"] == "caf\u00e9 \u2713"


# ---------------------------------------------------------------- shards outside the directory

def write_index(path, shard_names):
    """Point the index's first entries at `shard_names` (the rest stay as transformers wrote them)."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    names = sorted(index["weight_map"])
    for name, shard in zip(names, shard_names):
        index["weight_map"][name] = shard
    index_file.write_text(json.dumps(index))
    return index_file


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "sub/../../other/model.safetensors",
                                   "ABSOLUTE", "..", "", 5, None, ["model-00001-of-00011.safetensors"]])
def test_shard_outside_the_model_directory_is_refused(dirs, tmp_path, shard):
    # A real file outside the directory: the loader must not read it even though it exists and is valid.
    outside = copy(dirs["qwen2"], tmp_path / "other")
    path = copy(dirs["qwen2_sharded"], tmp_path / "m")
    if shard == "ABSOLUTE":
        shard = str(outside / "model.safetensors")
    index_file = write_index(path, [shard])
    msg = expect_error(path, str(index_file), "shard")
    assert repr(shard)[:20] in msg, msg


def test_shards_linked_from_a_cache_still_load(dirs, tmp_path):
    """The Hugging Face cache links each file of a snapshot to ../../blobs/: names are checked, links are not
    followed, so such a directory still loads."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in dirs["qwen2_sharded"].iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    assert torch.equal(logits(load_pretrained(snapshot)), logits(load_pretrained(dirs["qwen2_sharded"])))


@pytest.mark.parametrize("content", ["[]", "null", "3", '{"weight_map": ["model-00001-of-00011.safetensors"]}'])
def test_index_that_is_not_an_object_is_one_line(dirs, tmp_path, content):
    path = copy(dirs["qwen2_sharded"], tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(content)
    expect_error(path, str(path / "model.safetensors.index.json"))


# ---------------------------------------------------------------- impossible config.json values

BAD_CONFIG = [  # (change to the tiny qwen2 config.json, the field the error must name)
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"num_attention_heads": -4}, "num_attention_heads"),
    ({"num_attention_heads": 4.5}, "num_attention_heads"), ({"num_attention_heads": "4"}, "num_attention_heads"),
    ({"num_attention_heads": True}, "num_attention_heads"), ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"), ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"), ({"hidden_size": -64}, "hidden_size"),
    ({"hidden_size": 64.5}, "hidden_size"), ({"hidden_size": 10**12}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"), ({"hidden_size": [64]}, "hidden_size"),
    ({"hidden_size": 2}, "hidden_size"),  # smaller than the 4 heads: head_dim would be 0
    ({"intermediate_size": 0}, "intermediate_size"), ({"intermediate_size": -128}, "intermediate_size"),
    ({"intermediate_size": 1.5}, "intermediate_size"), ({"intermediate_size": 10**12}, "intermediate_size"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"), ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_hidden_layers": -2}, "num_hidden_layers"), ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
    ({"vocab_size": 0}, "vocab_size"), ({"vocab_size": 10**12}, "vocab_size"), ({"vocab_size": None}, "vocab_size"),
    ({"head_dim": 0}, "head_dim"), ({"head_dim": 15}, "head_dim"), ({"head_dim": -16}, "head_dim"),
    ({"head_dim": 10**9}, "head_dim"), ({"head_dim": "16"}, "head_dim"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"max_position_embeddings": -1}, "max_position_embeddings"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings"),
    ({"max_position_embeddings": "512"}, "max_position_embeddings"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"), ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"), ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rms_norm_eps": 2.0}, "rms_norm_eps"),
    ({"rope_parameters": None, "rope_theta": 0}, "rope_theta"),
    ({"rope_parameters": None, "rope_theta": -1e4}, "rope_theta"),
    ({"rope_parameters": None, "rope_theta": "1e4"}, "rope_theta"),
    ({"rope_parameters": None, "rope_theta": float("inf")}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, "rope_theta"),
    ({"rope_parameters": ["default"]}, "rope_parameters"), ({"rope_parameters": "default"}, "rope_parameters"),
    ({"rope_parameters": None, "rope_scaling": ["linear"]}, "rope_scaling"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"), ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
    ({"use_sliding_window": "no"}, "use_sliding_window"), ({"layer_types": 5}, "layer_types"),
    ({"torch_dtype": 5}, "torch_dtype"), ({"torch_dtype": "float33"}, "torch_dtype"), ({"dtype": "int8"}, "dtype"),
    ({"eos_token_id": "2"}, "eos_token_id"), ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": 10**6}, "eos_token_id"), ({"eos_token_id": [2, "x"]}, "eos_token_id"),
    ({"bos_token_id": 1.5}, "bos_token_id"), ({"pad_token_id": True}, "pad_token_id"),
    ({"model_type": ["qwen2"]}, "model_type"), ({"architectures": "Qwen2ForCausalLM"}, "architectures"),
]


@pytest.mark.parametrize("change, field", BAD_CONFIG, ids=[f"{f}={v!r}"[:60] for c, f in BAD_CONFIG
                                                           for v in [c.get(f)]])
def test_impossible_config_value_is_one_line_naming_field_and_value(dirs, tmp_path, change, field):
    path = copy(dirs["qwen2"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "config.json").write_text(json.dumps(cfg))
    msg = expect_error(path, str(path / "config.json"), field)
    value = change.get(field)
    if value is not None:
        assert repr(value)[:20] in msg, msg


@pytest.mark.parametrize("content", ["[]", '["model_type", "qwen2"]', "null", "3", '"qwen2"'])
def test_config_that_is_not_an_object_is_one_line(dirs, tmp_path, content):
    path = copy(dirs["qwen2"], tmp_path / "m")
    (path / "config.json").write_text(content)
    expect_error(path, str(path / "config.json"), "not a JSON object")


def test_llama_3_2_config_passes_validation():
    from nano_gtalign.model_config import Llama3RopeScaling, ModelConfig
    # Llama-3.2-1B-Instruct's config.json (the fields that matter), as published: rope_scaling, top-level theta.
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "head_dim": 64,
         "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
         "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "use_cache": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    c = ModelConfig.from_hf(d)
    assert (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings, c.attention_bias) == (64, 8, True, False)
    assert c.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192) and c.rope_theta == 5e5


def test_largest_published_shapes_pass_validation():
    from nano_gtalign.model_config import ModelConfig
    # Qwen2.5-72B-Instruct's config.json (the sizes that matter): the limits must leave real models alone.
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
         "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
         "vocab_size": 152064, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
         "torch_dtype": "bfloat16", "tie_word_embeddings": False, "use_sliding_window": False,
         "bos_token_id": 151643, "eos_token_id": 151645, "rope_scaling": None, "sliding_window": 131072}
    c = ModelConfig.from_hf(d)
    assert (c.head_dim, c.num_hidden_layers, c.rope_theta) == (128, 80, 1e6)


# ---------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(dirs, tmp_path, bad):
    path = copy(dirs["qwen2"], tmp_path / "m")

    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    rewrite_weights(path, poison)
    expect_error(path, str(path / "model.safetensors"), "'model.layers.1.mlp.up_proj.weight'", "not finite")


def test_weight_that_overflows_the_requested_dtype_is_named(dirs, tmp_path):
    path = copy(dirs["qwen2"], tmp_path / "m")
    rewrite_weights(path, lambda s: s["model.norm.weight"].__setitem__(0, 1e6))  # fine in fp32, inf in fp16
    load_pretrained(path)  # the stored fp32 weights are finite
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path, dtype="float16")
    msg = str(info.value)
    assert "'model.norm.weight'" in msg and "float16" in msg and "\n" not in msg, msg
