"""The README works when pasted: its commands name options that exist, and its CPU blocks run.

The default run parses every ``sdexport`` command of every block with the CLI itself (cheap: no
model loads), and checks that each block says how it is checked (``readme_blocks``). The slow test
pastes the blocks a reader can run on this CPU machine, in order, in an empty folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer
from readme_blocks import CHECKS, README, blocks, paste, reader_environment, sdexport_commands

from sdexport.cli import app

ROOT = Path(__file__).parent.parent


def _command(args: list[str]) -> tuple[Any, str, list[str]]:
    """The CLI command ``args`` name, its name and its own arguments. ``sdexport bench SCENARIO`` is
    ``bench run SCENARIO``, as the bench group reads it."""
    group: Any = typer.main.get_command(app)
    name = "sdexport"
    while hasattr(group, "commands"):
        first = args[0] if args else None
        if first in group.commands:
            group, name, args = group.commands[first], first, args[1:]
        elif name == "bench" and first is not None and not first.startswith("-"):
            group, name = group.commands["run"], "run"
        else:
            raise LookupError(f"no command {first!r} in sdexport{'' if name == 'sdexport' else ' ' + name}")
    return group, name, args


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


def test_every_code_block_says_how_it_is_checked():
    found = blocks()
    assert len(found) > 20, "the README's blocks were not found"
    unmarked = [b.line for b in found if b.check not in CHECKS]
    assert not unmarked, (f"README blocks at lines {unmarked}: put <!-- docs-check: run|serve|skip: why --> on "
                          "the line above the fence (tests/readme_blocks.py)")
    assert not [b.line for b in found if b.check == "skip" and not b.why], "a skipped block says why"
    unlabelled = [b.line for b in blocks(languages=("", "sh", "shell", "console", "py"))
                  if re.search(r"-m sdexport\b|^\W*sdexport [a-z]", b.text, re.M)]
    assert not unlabelled, f"README blocks at lines {unlabelled} run sdexport: label them ```bash (or ```python)"
    assert not [b.line for b in found if b.check == "serve" and "localhost:8000" not in b.text]
    for block in found:  # bash -e stops at a failing command, but not at one before a `&&`
        lines = [line for line in block.text.replace("\\\n", " ").splitlines() if line.strip()]
        assert block.check == "skip" or not any("&&" in line for line in lines[:-1]), (
            f"README block at line {block.line}: `&&` only on its last line (a failure before it would go unseen)")


def test_every_sdexport_command_in_the_readme_parses():
    """Option names, their values' types and the required arguments, as the CLI parses them (the
    commands do not run: a placeholder path parses as well as a real one)."""
    count = 0
    for block in blocks():
        if block.language != "bash":
            continue
        for args in sdexport_commands(block.text):
            try:
                command, name, own = _command(args)
                command.make_context(name, own)
            except Exception as exc:  # the parser's usage errors (typer vendors click: no public class)
                pytest.fail(f"README block at line {block.line}: sdexport {' '.join(args)}: {exc}")
            count += 1
    assert count > 50, "the README's sdexport commands were not found"


def test_sdexport_commands_in_the_readme_prose_name_options_that_exist():
    """Inline spans that start `sdexport CMD`: the command exists and has the options named (the
    arguments are often left out or named in capitals, so only the names are checked)."""
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    checked = 0
    for span in re.findall(r"`([^`\n]+)`", prose):
        if not re.match(r"(python3? -m )?sdexport [a-z]", span):
            continue
        args = span.split("sdexport ", 1)[1].split()
        options = [a.split("=")[0] for a in args if re.match(r"--?[a-zA-Z]", a)]
        command, name, _ = _command([a for a in args if not a.startswith("-")])
        unknown = [o for o in options if o not in _options(command)]
        assert not unknown, f"README: `{span}`: sdexport {name} has no {unknown}"
        checked += 1
    assert checked > 10


def test_ci_runs_exactly_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"{command}\n" in [b.text for b in blocks()], f".ci/run's {command!r} is not a README block"


@pytest.mark.slow
def test_the_readme_runs_when_pasted(tmp_path):
    """The ``run`` blocks, in order, in one empty folder, as a reader pastes them: each exits 0 and
    leaves what its commands name with ``-o``. ``python3`` is this interpreter; ``scripts/setup.sh``
    only says it was skipped (this environment is installed; CI runs the real one)."""
    folder = tmp_path / "reader"
    for tree in ("benchmarks", "ci", "scripts"):  # copies: nothing a block writes reaches the repository
        shutil.copytree(ROOT / tree, folder / tree, ignore=shutil.ignore_patterns("results", "__pycache__"))
    (folder / "scripts" / "setup.sh").write_text('echo "scripts/setup.sh: skipped (the test environment is installed)"\n')
    env = reader_environment(tmp_path / "bin")
    ran = 0
    for block in blocks():
        if block.check != "run":
            continue
        done = paste(block, folder, env)
        assert done.returncode == 0, f"README block at line {block.line} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        for args in sdexport_commands(block.text) if block.language == "bash" else []:
            for flag in ("-o", "--output"):
                if flag in args:
                    written = folder / args[args.index(flag) + 1]
                    several = list(written.parent.glob(f"{written.stem}-*{written.suffix}"))
                    assert written.exists() or several, f"README block at line {block.line}: sdexport {args[0]} wrote no {written}"
        ran += 1
    assert ran >= 8
