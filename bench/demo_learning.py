"""Does the demo learn? Run `python train.py` (the built-in demo) and report before/after and the margin.

    python bench/demo_learning.py                     # the demo exactly as `python train.py` runs it
    python bench/demo_learning.py --steps 60 --lr 5e-4   # any train.py flag is passed through

Prints train.py's own output, then the before/after table of the held-out evaluation (greedy), the wall
time of the whole run (task, tokenizer, warm-start, both evaluations, GRPO, export) and the welfare margin
W_after - W_before. Exits with status 1 when welfare did not rise.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    res = train.main(argv)
    wall = time.perf_counter() - t0
    if res.table is None:
        print("no before/after evaluation (was --eval-every -1 given?)")
        return 1
    before, after = res.evals[0], res.evals[-1]
    margin = after["welfare"] - before["welfare"]
    print("\n=== bench/demo_learning.py ===")
    print(f"threads {torch.get_num_threads()} | wall time {wall:.0f}s ({wall / 60:.1f} min) | "
          f"steps {after['step']}")
    print(res.table)
    print(f"welfare margin W_after - W_before = {after['welfare']:.3f} - {before['welfare']:.3f} = {margin:+.3f}")
    return 0 if margin > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
