"""Read and write Hugging Face model directories: config.json + safetensors (single or sharded) + tokenizer.

Loading builds the model on the meta device and assigns the tensors read from disk, so the weights exist
once in memory (a 3B bf16 model needs 6 GB, not 12). Saving writes the same layout back, loadable by
transformers and vLLM unchanged, with the modes of normal files (0644 under umask 022) so other users can read
a shared model. A model trained in fp32 from a bf16 checkpoint is exported as the checkpoint was: its dtype
and its generation_config.json (sampling defaults) are read with `export_defaults` and passed to
`save_pretrained`. Every problem with a checkpoint is a one-line CheckpointError naming the file, an unreadable
one included ("permission denied reading FILE"): impossible config.json values (ModelConfig.from_hf checks
each field), shards named outside the directory, and NaN or inf weights are refused here, at load time, so
nothing later (the model, the sampler, training) has to check for them.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nano_gtalign.errors import CheckpointError
from nano_gtalign.model import Transformer
from nano_gtalign.model_config import ModelConfig
from nano_gtalign.tokenizer import Tokenizer

# Older safetensors releases do not export their error type.
SafetensorError = getattr(safetensors, "SafetensorError", Exception)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The files Tokenizer.from_pretrained reads (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def default_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (0644 under the usual 022). safetensors writes
    through a private temporary file and leaves 0600, which other users of a shared model cannot read."""
    try:  # Linux reports the umask without changing it (os.umask would, racing other threads)
        status = Path("/proc/self/status").read_text()
        return 0o666 & ~int(re.search(r"^Umask:\s*([0-7]+)$", status, re.M).group(1), 8)
    except (OSError, AttributeError):  # not Linux, or a kernel before 4.7
        return 0o644


def _reports_permission(load):
    """`load(path, ...)` with a PermissionError turned into "permission denied reading FILE": otherwise
    it is a traceback, or (from safetensors and tokenizers) a misleading "No such file or directory"."""
    @functools.wraps(load)
    def wrapper(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except PermissionError as e:
            raise CheckpointError(f"permission denied reading {e.filename or path}") from None
    return wrapper


def _check_readable(file: Path) -> None:
    """Open `file` before a library that would misreport a PermissionError reads it."""
    with file.open("rb"):
        pass


def _read_json(file: Path) -> dict:
    """A JSON object file (config.json, the shard index, generation_config.json), or a CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"{file}: file is missing")
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: not a JSON object (the file holds a {type(value).__name__})")
    return value


@_reports_permission
def load_config(path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    file = path / "config.json"
    try:
        return ModelConfig.from_hf(_read_json(file))
    except (ValueError, TypeError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: {_one_line(e)}") from None


def weight_files(path: Path) -> tuple[Path, list[Path]]:
    """(the file that lists the weights, the safetensors files to read)."""
    index = path / INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        for name in weight_map.values():
            _check_shard_name(index, name)
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
        return index, files
    if (path / SINGLE).is_file():
        return path / SINGLE, [path / SINGLE]
    raise CheckpointError(f"{path / SINGLE}: no weights ({SINGLE} and {INDEX} are both missing)")


def _check_shard_name(index: Path, name) -> None:
    """A shard the index names must be a relative path inside the model directory: "../other/x.safetensors"
    or an absolute path would make loading read (and a later save trust) some other model's file. The name is
    checked, not where it leads: the Hugging Face cache links each file of a snapshot to ../../blobs/."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: shard {name!r} is not a file name")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{index}: shard {name!r} is outside the model directory")


def _check_finite(file: Path, name: str, stored: torch.Tensor, loaded: torch.Tensor) -> None:
    """NaN or inf in a weight makes the logits NaN: greedy sample.py printed <|endoftext|> (token 0) and exited
    0, so such a checkpoint is refused here, naming the tensor. A sum is finite only if every element is (a
    NaN or inf anywhere makes it NaN or inf), and one reduction is far cheaper than an elementwise mask; only
    when it is not (a real non-finite value, or a sum that merely overflows) is every element looked at."""
    if torch.isfinite(loaded.sum()) or bool(torch.isfinite(loaded).all()):
        return
    if bool(torch.isfinite(stored).all()):  # finite in the file: the requested dtype cannot hold it
        want, have = (str(t.dtype).removeprefix("torch.") for t in (loaded, stored))
        raise CheckpointError(f"{file}: weight {name!r} is not finite in {want} (its values exceed the range of "
                              f"{want}); load it in {have}")
    bad = int((~torch.isfinite(stored)).sum())
    raise CheckpointError(f"{file}: weight {name!r} is not finite ({bad} of {stored.numel()} values are NaN or "
                          "inf): the checkpoint is corrupt or its training diverged")


# safetensors' dtype names -> torch's, for the dtypes a model is stored in
STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass
class ExportDefaults:
    """What an export of a model trained from a checkpoint directory keeps of it."""
    dtype: str | None                    # the stored weights' dtype ('bfloat16', ...); None: not a float dtype
    generation_config: dict = field(default_factory=dict)  # generation_config.json (sampling defaults), {} if none


@_reports_permission
def export_defaults(path) -> ExportDefaults:
    """The dtype of a model directory's stored weights and its generation_config.json, for save_pretrained
    (train.py loads in fp32 to train, so the model no longer knows either)."""
    path = Path(path)
    load_config(path)  # a missing directory or bad config.json is named as load_pretrained names it
    _, files = weight_files(path)
    _check_readable(files[0])
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            first = next(iter(f.keys()), None)
            stored = f.get_slice(first).get_dtype() if first is not None else None
    except SafetensorError as e:
        raise CheckpointError(f"{files[0]}: corrupt or truncated safetensors file ({_one_line(e)})") from None
    gen_file = path / "generation_config.json"
    generation = _read_json(gen_file) if gen_file.is_file() else {}
    if not isinstance(generation, dict):
        raise CheckpointError(f"{gen_file}: not a JSON object")
    return ExportDefaults(STORED_DTYPES.get(stored), generation)


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(getattr(torch, str(dtype), None), torch.dtype):
        return getattr(torch, str(dtype))
    raise ValueError(f"unknown dtype {dtype!r} (e.g. 'bfloat16', 'float32')")


@_reports_permission
def load_pretrained(path, dtype=None, device="cpu") -> Transformer:
    """Load a Qwen2/Qwen3/Llama model directory. dtype None keeps the checkpoint's dtype. Returned in eval mode."""
    path = Path(path)
    config = load_config(path)
    dtype = _as_dtype(dtype)
    with torch.device("meta"):  # no memory is allocated for these parameters
        model = Transformer(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    listing, files = weight_files(path)

    state: dict[str, torch.Tensor] = {}
    for file in files:
        _check_readable(file)  # safe_open reports a file it may not read as "No such file or directory"
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    # Tied checkpoints sometimes still store lm_head; old ones store the RoPE buffer.
                    tied_copy = name == "lm_head.weight" and config.tie_word_embeddings
                    if tied_copy or name.endswith("rotary_emb.inv_freq"):
                        continue
                    if name not in expected:
                        raise CheckpointError(f"{file}: unexpected weight {name!r} (not part of a "
                                              f"{config.model_type} model with this config.json)")
                    t = f.get_tensor(name)
                    if t.shape != expected[name]:
                        raise CheckpointError(f"{file}: weight {name!r} has shape {tuple(t.shape)}, "
                                              f"config.json implies {tuple(expected[name])}")
                    dtype = dtype or t.dtype  # a mixed-dtype checkpoint is cast to its first tensor's dtype
                    state[name] = t.to(dtype)
                    _check_finite(file, name, t, state[name])
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({_one_line(e)})") from None
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{listing}: missing weights {missing[:3]}{more}")

    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)  # non-persistent buffers are still on meta after assign
    return model.eval()


@_reports_permission
def load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    for name in TOKENIZER_FILES:  # tokenizers reports an unreadable tokenizer.json without naming it
        if (path / name).is_file():
            _check_readable(path / name)
    try:
        return Tokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(_one_line(e)) from None


def _shards(state: dict[str, torch.Tensor], max_shard_size: int, itemsize: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(model: Transformer, out: Path, dtype: torch.dtype, max_shard_size: int) -> None:
    """model.safetensors, or shards of at most max_shard_size bytes and their index, in `dtype` (each shard
    cast as it is written, so an fp32 model is never held twice)."""
    # The state dict has no lm_head when tied (one tensor, as transformers expects for tied checkpoints).
    state = model.state_dict()
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(state, max_shard_size, itemsize)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for file, shard in zip(names, shards):
        tensors = {name: state[name].detach().to("cpu", dtype).contiguous() for name in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})  # transformers requires format=pt
    if len(shards) > 1:
        total = sum(t.numel() for t in state.values()) * itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}}
        (out / INDEX).write_text(json.dumps(index, indent=2))


def _generation_config(model: Transformer, tokenizer: Tokenizer | None, keep: dict | None) -> dict:
    """generation_config.json: `keep` (the input's sampling defaults: temperature, top_p, top_k, repetition
    penalty, ...) with the special token ids of what is saved. The tokenizer's EOS ids already include the
    input's generation_config ones (Tokenizer.from_pretrained reads both)."""
    c = model.config
    eos = tokenizer.eos_token_ids if tokenizer is not None else c.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None else c.pad_token_id
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    return {**(keep or {}), "bos_token_id": c.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}


def save_pretrained(model: Transformer, tokenizer: Tokenizer | None, path, max_shard_size: int = 5 * 10**9,
                    dtype=None, generation_config: dict | None = None) -> None:
    """Write a Hugging Face model directory. Everything goes to a temporary sibling directory that is renamed
    into place at the end, so a crash never leaves a half-written model that looks complete.

    dtype (a torch dtype or its name; None: the model's own) is the dtype the weights are written in, and
    config.json's torch_dtype. generation_config (e.g. export_defaults(input).generation_config) is kept in
    generation_config.json, with the BOS/EOS/pad ids of this model and tokenizer."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    dtype = _as_dtype(dtype) or model.output_weight().dtype
    if not dtype.is_floating_point:
        raise ValueError(f"cannot save the weights as {str(dtype).removeprefix('torch.')}: not a float dtype")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    _write_weights(model, tmp, dtype, max_shard_size)
    (tmp / "generation_config.json").write_text(json.dumps(_generation_config(model, tokenizer, generation_config),
                                                           indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    # torch_dtype: the key transformers <5 and vLLM read
    config = dict(model.config.to_hf(), torch_dtype=str(dtype).removeprefix("torch."))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    mode = default_file_mode()
    for file in tmp.iterdir():  # readable by others like any new file (safetensors leaves 0600)
        file.chmod(mode)

    if path.exists():  # swap the old directory out only once the new one is complete
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
