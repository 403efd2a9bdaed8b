"""How much code a reader follows through one GRPO step of the demo, measured by running it.

    python bench/reading_path.py            # the demo, shrunk to seconds: rule judge, CPU, GRPO
    python bench/reading_path.py --algo ppo

It runs train.py's demo for two steps with a profiler on and records every function of this repository
that runs during the second step (from drawing its prompts to its optimizer step, its log line and
metrics), plus the function that holds the training loop. model.py (with model_config.py) and the sampler
(sampling.py, static_decode.py, cpu_packing.py) are left out: they are read once, as the model, not as part of the
step. A function counts whole (a reader reads all of it), each line once. It also prints how many calls below the
loop the loss and the log-prob kernel sit: the frames between the loop's function and the first call of each.
"""
from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
NOT_COUNTED = {"nano_gtalign/model.py", "nano_gtalign/model_config.py", "nano_gtalign/sampling.py",
               "nano_gtalign/static_decode.py", "nano_gtalign/cpu_packing.py"}
LOSS_NAMES = ("policy_loss",)                    # the clipped surrogate
KERNEL_NAMES = ("fused_logprobs",)               # the log-prob kernel's entry point
# The demo with its full warm start (so that completions have the four blocks and every scoring term runs),
# two short steps, no evaluation.
SMALL_DEMO = ["--demo-train-size", "200", "--eval-every", "-1", "--prompts-per-step", "4", "--group-size", "4",
              "--steps", "2", "--save-every", "0"]


def loop_lines(script: Path) -> tuple[str, range]:
    """(name of the function holding `for step in ...`, the loop's line range) in the training script."""
    for fn in ast.walk(ast.parse(script.read_text())):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "step":
                    return fn.name, range(node.lineno, node.end_lineno + 1)
    raise SystemExit(f"{script}: no `for step in ...` loop found")


def function_spans(path: Path) -> dict[int, tuple[int, int]]:
    """first line of each def (decorators included) -> (first, last) line of the whole definition."""
    spans = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans[node.lineno] = (first, node.end_lineno)
            spans[first] = (first, node.end_lineno)
    return spans


def measure(argv: list[str]) -> None:
    import train

    script = ROOT / "train.py"
    loop_fn, loop = loop_lines(script)
    seen_second = {"yes": False, "active": False}  # active: the main thread is in the second step
    ran: set[tuple[str, int]] = set()          # (file, first line of the def) of every function that ran
    depth: dict[str, int] = {}

    def in_second_step(frame) -> int | None:
        """Frames between the loop's function and `frame` while the loop runs its second step, else None."""
        n, f = 0, frame
        while f is not None:
            if f.f_code.co_name == loop_fn and Path(f.f_code.co_filename).resolve() == script.resolve():
                seen_second["active"] = f.f_lineno in loop and f.f_locals.get("step") == 2
                if seen_second["active"]:
                    seen_second["yes"] = True
                    return n
                return None
            f, n = f.f_back, n + 1
        return None

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        path = Path(code.co_filename)
        if not path.is_absolute() or path.suffix != ".py":  # <frozen ...>, <string>
            return
        try:
            rel = path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            return
        if threading.current_thread() is threading.main_thread():
            n = in_second_step(frame)
            if n is None:
                return
        elif seen_second["active"]:  # a worker of the step (the judge's thread pool): depth not counted
            n = -1
        else:
            return
        for name in LOSS_NAMES + KERNEL_NAMES:
            if code.co_name == name and name not in depth and n >= 0:
                depth[name] = n
        if rel not in NOT_COUNTED and not rel.startswith("tests/"):
            ran.add((rel, code.co_firstlineno))

    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(profile)
        threading.setprofile(profile)
        try:
            train.main(SMALL_DEMO + ["--out-dir", out, *argv])
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    if not seen_second["yes"]:
        raise SystemExit("the second step never ran")

    lines: dict[str, set[int]] = defaultdict(set)
    loop_def = next(n for n in ast.walk(ast.parse(script.read_text()))
                    if isinstance(n, ast.FunctionDef) and n.name == loop_fn)
    lines["train.py"].update(range(loop_def.lineno, loop_def.end_lineno + 1))
    spans = {}
    for rel, first in sorted(ran):
        if rel not in spans:
            spans[rel] = function_spans(ROOT / rel)
        lo, hi = spans[rel].get(first, (first, first))  # lambdas, comprehensions: inside a def already counted
        lines[rel].update(range(lo, hi + 1))
    total = sum(len(v) for v in lines.values())
    print(f"one GRPO step of the demo ({' '.join(argv) or 'GRPO'}), model.py and the sampler not counted:")
    print(f"{'file':40s} {'lines':>6s}")
    for rel in sorted(lines, key=lambda r: -len(lines[r])):
        print(f"{rel:40s} {len(lines[rel]):6d}")
    print(f"{'total':40s} {total:6d}  in {len(lines)} files")
    for name in LOSS_NAMES + KERNEL_NAMES:
        print(f"{name}: {depth.get(name, 'not called')} calls below `{loop_fn}`'s loop")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", default="grpo", choices=("grpo", "ppo"))
    args = parser.parse_args()
    measure([] if args.algo == "grpo" else ["--algo", "ppo"])
