"""No module of this repository takes an import name that an installed distribution or the standard library uses.

With the repository root on sys.path (every script, `python -m pytest`), a top-level package or module of ours
shadows whatever else has its name: transformers 5.25's `from kernels import ...` once found a top-level
kernels/ of ours instead of Hugging Face's `kernels` package. A script run by path also puts its own folder on
sys.path, so the names beside it count too, unless the script puts the root there instead before it imports
anything outside the standard library (bench/*.py do).
"""
from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"nano-gtalign", "nano_gtalign"}  # this project, when someone has pip-installed it


def top_level_names(folder: Path) -> dict[str, Path]:
    """Import names that `folder` provides when it is on sys.path: packages and modules. A folder of .py files
    without __init__.py (tests/) counts too: it is a namespace package, and an installed regular package of
    its name would win over it and break `from tests.tiny import ...`."""
    names = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir() and any(entry.glob("*.py")):
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd") and entry.stem != "__init__":
            names[entry.name.split(".")[0]] = entry
    return names


def taken_names() -> dict[str, str]:
    """Top-level import names of installed distributions (not ours) and of the standard library -> who owns it."""
    taken = {name: "the standard library" for name in sys.stdlib_module_names}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = sorted(set(dists) - OURS)
        if others:
            taken[name] = "distribution " + ", ".join(others)
    return taken


def collisions(folder: Path, taken: dict[str, str]) -> list[str]:
    return [f"{path.relative_to(folder.parent)} is importable as '{name}', a name of {taken[name]}"
            for name, path in top_level_names(folder).items() if name in taken]


def is_script(path: Path) -> bool:
    return 'if __name__ == "__main__"' in path.read_text(encoding="utf-8")


def keeps_its_folder_on_path(script: Path) -> bool:
    """False when the script replaces sys.path[0] (its own folder) before its first import from outside the
    standard library; True otherwise, since then the names beside it are importable while it runs."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    replaced = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(ast.unparse(t) == "sys.path[0]" for t in node.targets)]
    outside = [node.lineno for node in ast.walk(tree)
               if (isinstance(node, ast.Import)
                   and any(a.name.split(".")[0] not in sys.stdlib_module_names for a in node.names))
               or (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                   and node.module.split(".")[0] not in sys.stdlib_module_names)]
    return not (replaced and (not outside or min(replaced) < min(outside)))


def script_folders() -> list[Path]:
    """Folders other than the root that hold a script someone runs by path, with the folder kept on sys.path."""
    folders = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or len(rel.parts) == 1:
            continue
        if is_script(path) and keeps_its_folder_on_path(path):
            folders.add(path.parent)
    return sorted(folders)


def test_no_top_level_name_of_ours_is_taken():
    taken = taken_names()
    assert "kernels" not in top_level_names(ROOT)  # the Triton kernels live in nano_gtalign/kernels/
    problems = collisions(ROOT, taken)
    for folder in [ROOT / "tests", *script_folders()]:  # pytest puts tests/ on sys.path for its own imports
        problems += collisions(folder, taken)
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_collision(tmp_path):
    taken = taken_names()
    installed = next(name for name, owner in taken.items() if owner.startswith("distribution") and name.isidentifier())
    (tmp_path / installed).mkdir()
    (tmp_path / installed / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "docs").mkdir()  # no Python in it: not importable as anything that matters
    (tmp_path / "fine_name_of_ours.py").write_text("")
    found = collisions(tmp_path, taken)
    assert len(found) == 2
    assert any(f"'{installed}'" in line for line in found) and any("'json'" in line for line in found)


def test_bench_scripts_put_the_root_in_place_of_their_folder(tmp_path):
    # bench/kernels.py would be `kernels` while it runs if bench/ stayed on sys.path
    for script in sorted((ROOT / "bench").glob("*.py")):
        assert not keeps_its_folder_on_path(script), f"{script.name} keeps bench/ on sys.path"
    late = tmp_path / "late.py"
    late.write_text('import sys\nimport torch\nsys.path[0] = "/"\nif __name__ == "__main__":\n    pass\n')
    assert keeps_its_folder_on_path(late)  # replaced only after a third-party import: too late
    early = tmp_path / "early.py"
    early.write_text('import sys\nsys.path[0] = "/"\nimport torch\n')
    assert not keeps_its_folder_on_path(early)
