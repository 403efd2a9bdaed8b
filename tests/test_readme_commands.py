"""Every train.py, eval.py and sample.py command the README shows parses with the script's own flags.

A renamed or removed flag then fails here instead of in a reader's terminal. Commands with a `...`
placeholder are left out (they stand for "the command above, plus").
"""
import re
import shlex
from pathlib import Path

import pytest

import eval as eval_script
import sample
import train

README = Path(__file__).resolve().parents[1] / "README.md"
PARSERS = {"train.py": train.parse_args,
           "eval.py": lambda argv: eval_script.build_parser().parse_args(argv),
           "sample.py": lambda argv: sample.build_parser().parse_args(argv)}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) for each command line in the README's code blocks, continuations joined."""
    commands, in_code, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        line = pending + line.strip().removeprefix("$ ")
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.sub(r"\s+#\s.*$", "", line)   # a shell comment (a '#' inside a word, as in URL#model, is not one)
        for part in line.split(" && "):
            if not re.match(r"(python|torchrun) .*\b(train|eval|sample)\.py\b", part.strip()):
                continue
            words = shlex.split(part)
            script = next((w for w in words if w in PARSERS), None)
            if script and "..." not in words:
                commands.append((script, words[words.index(script) + 1:]))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands_for_every_script():
    assert {script for script, _ in COMMANDS} == set(PARSERS)
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("script,argv", COMMANDS, ids=[f"{s} {' '.join(a)}"[:80] for s, a in COMMANDS])
def test_readme_command_parses(script, argv, capsys):
    try:
        PARSERS[script](argv)
    except SystemExit as e:
        pytest.fail(f"README: `{script} {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()} "
                    f"(exit {e.code})")
