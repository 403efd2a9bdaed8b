"""bench/reading_path.py finds train.py's loop and whole function spans (the run itself is a bench, minutes)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reading_path", ROOT / "bench" / "reading_path.py")
reading_path = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reading_path)


def test_finds_the_training_loop():
    name, lines = reading_path.loop_lines(ROOT / "train.py")
    text = (ROOT / "train.py").read_text().splitlines()
    assert name == "run" and text[lines.start - 1].strip().startswith("for step in range(")
    assert len(lines) > 10


def test_function_spans_include_decorators_and_the_whole_body(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import functools\n\n\n@functools.cache\ndef f(x):\n    y = x\n    return y\n\n\ndef g():\n"
                   "    def h():\n        return 1\n    return h\n")
    spans = reading_path.function_spans(src)
    assert spans[5] == (4, 7) and spans[4] == (4, 7)   # by the def line (what a code object reports) or decorator
    assert spans[10] == (10, 13) and spans[11] == (11, 12)
