"""The built-in demo: where `python train.py` (no --model) writes its outputs, which sample.py and eval.py
read by default."""

DEMO_OUT_DIR = "out/demo"
DEMO_MODEL = f"{DEMO_OUT_DIR}/final"          # the trained model, Hugging Face format
DEMO_TEST_DATA = f"{DEMO_OUT_DIR}/test.jsonl"  # the held-out test split


def missing_model_hint(path: str) -> str:
    """What to do when the model directory `path` does not exist."""
    if path == DEMO_MODEL:
        return "run `python train.py` first (the demo saves its model there) or pass --model DIR"
    return "pass --model DIR, a checkpoint directory with config.json"


def missing_data_hint(path: str) -> str:
    """What to add when the records file `path` does not exist."""
    return " (run `python train.py` first: the demo writes it)" if path == DEMO_TEST_DATA else ""
