"""The README works when pasted: its commands parse with the CLI, and its CPU blocks run.

The default run parses every ``sdexport`` command of every bash block with the CLI's own parser
(cheap: nothing runs), and checks that each block says how it is checked (``readme_blocks``). The
slow test pastes the blocks a reader can run on this CPU machine, in order, in a fresh folder.
"""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer
from readme_blocks import CHECKS, blocks, paste, prose, reader_environment, sdexport_commands, shell_lines

from sdexport.cli import app

ROOT = Path(__file__).parent.parent


@functools.cache
def _cli() -> Any:
    """The CLI as click sees it, built once (typer builds it anew on every call)."""
    return typer.main.get_command(app)


def _parse(args: list[str], resilient: bool = False) -> Any:
    """The context of the command ``sdexport ARGS`` would run, parsed by the CLI's own parser and
    routed as a run routes it (group options such as ``-v`` before the command's name, ``sdexport
    bench SCENARIO`` as ``bench run``). ``resilient``: unknown options and missing arguments pass
    (for commands quoted in prose without their arguments). Nothing is invoked."""
    context = _cli().make_context("sdexport", list(args), resilient_parsing=resilient)
    while hasattr(context.command, "commands"):  # a group; click (vendored by typer >= 0.26) keeps the name here
        words = [*context._protected_args, *context.args]
        if not words:
            return context  # the group's own options alone (`sdexport --version`)
        name, command, rest = context.command.resolve_command(context, words)
        if command is None:
            raise LookupError(f"no command {words[0]!r}")
        context = command.make_context(name, rest, parent=context, resilient_parsing=resilient)
    return context


def _choices() -> dict[str, tuple[str, ...]]:
    """Options whose values the commands check themselves (plain strings to the parser), with the
    values they take."""
    from sdexport.cli import BUILD_TARGETS
    from sdexport.export.plan import DTYPES, VERIFY_MODES
    from sdexport.runtime.request import BACKENDS
    from sdexport.runtime.schedulers import DEFAULT, SCHEDULERS

    return {"dtype": DTYPES, "verify": VERIFY_MODES, "target": BUILD_TARGETS, "backend": BACKENDS,
            "scheduler": (DEFAULT, *SCHEDULERS)}


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


def test_every_code_block_says_how_it_is_checked():
    found = blocks()
    assert len(found) > 20, "the README's blocks were not found"
    unmarked = [b.line for b in found if b.check not in CHECKS]
    assert not unmarked, (f"README blocks at lines {unmarked}: put <!-- docs-check: run|serve|skip: why --> on "
                          "the line above the fence (tests/readme_blocks.py)")
    assert not [b.line for b in found if b.check == "skip" and not b.why], "a skipped block says why"
    unlabelled = [b.line for b in blocks(languages=None) if b.language not in ("bash", "python")
                  and re.search(r"-m sdexport\b|^\W*sdexport [a-z]", b.text, re.M)]
    assert not unlabelled, f"README blocks at lines {unlabelled} run sdexport: label them ```bash"
    for block in found:
        if block.check == "serve":  # the test server's address replaces this one
            assert set(re.findall(r"localhost:(\d+)", block.text)) == {"8000"}, f"README block at line {block.line}"
        if block.check == "skip" or block.language != "bash":
            continue
        lines = shell_lines(block.text)
        # bash -e does not stop at a failure before `&&`, in `a || b`, or in `! a`
        assert not any("&&" in line for line in lines[:-1]) and not any(
            "||" in line or re.match(r"\s*!\s", line) for line in lines), (
            f"README block at line {block.line}: a failure there would go unseen (`&&` only on the last line, no "
            "`||` or `!`)")


def test_every_sdexport_command_in_the_readme_parses():
    """Option names, their values (types, and the names the commands take for --dtype, --verify,
    --target, --backend and --scheduler) and the required arguments, as the CLI parses them. The
    commands do not run: a placeholder path parses as well as a real one."""
    choices = _choices()
    count = 0
    for block in blocks(languages=("bash",)):
        for args in sdexport_commands(block.text):
            where = f"README block at line {block.line}: sdexport {' '.join(args)}"
            try:
                context = _parse(args, resilient="--help" in args or "--version" in args)  # which print, and exit
            except Exception as exc:  # the parser's usage errors (typer vendors click: no public class)
                pytest.fail(f"{where}: {exc}")
            for name, value in context.params.items():
                if isinstance(value, str) and name in choices:
                    assert value in choices[name], f"{where}: --{name} {value!r}: not one of {choices[name]}"
            count += 1
    assert count > 50, "the README's sdexport commands were not found"


def test_sdexport_commands_in_the_readme_prose_name_options_that_exist():
    """Inline spans that run `sdexport CMD ...`: the command exists and has the options named (the
    arguments are often left out or named in capitals, so only the names are checked)."""
    checked = 0
    for span in re.findall(r"`([^`\n]+)`", prose()):
        for args in sdexport_commands(span):
            words = [a for a in args if not a.startswith("-")]
            if not args or words and re.fullmatch(r"[A-Z_]+", words[0]):
                continue  # `sdexport`, `sdexport CMD`: no command named
            command = _parse(words, resilient=True).command if words else _cli()
            unknown = [o for o in (a.split("=")[0] for a in args if re.match(r"--?[a-zA-Z]", a))
                       if o not in _options(command)]
            assert not unknown, f"README: `{span}`: sdexport {command.name or ''} has no {unknown}"
            checked += 1
    assert checked > 10


def test_ci_runs_exactly_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"{command}\n" in [b.text for b in blocks()], f".ci/run's {command!r} is not a README block"


def _outputs(args: list[str]) -> list[str]:
    """What an sdexport command names with ``-o``/``--output`` (``--output=X`` too)."""
    named = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--output")]
    return named + [a.split("=", 1)[1] for a in args if a.startswith("--output=")]


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.slow
def test_the_readme_runs_when_pasted(tmp_path):
    """The ``run`` blocks, in order, in one fresh folder (holding copies of ``benchmarks/``, ``ci/``
    and ``scripts/``), as a reader pastes them: each exits 0, and each sdexport command in it writes
    what it names with ``-o`` (a new or changed path, or its first image ``NAME-0.EXT`` for several
    images). ``python3`` is this interpreter, importing this checkout; ``scripts/setup.sh`` only says
    it was skipped (this environment is installed; CI runs the real one)."""
    folder = tmp_path / "reader"
    for tree in ("benchmarks", "ci", "scripts"):  # copies: nothing a block writes reaches the repository
        shutil.copytree(ROOT / tree, folder / tree, ignore=shutil.ignore_patterns("results", "__pycache__"))
    (folder / "scripts" / "setup.sh").write_text('echo "scripts/setup.sh: skipped (the test environment is installed)"\n')
    env = reader_environment(tmp_path / "bin")
    ran = 0
    for block in blocks():
        if block.check != "run":
            continue
        expected = [folder / name for args in sdexport_commands(block.text) if block.language == "bash"
                    for name in _outputs(args)]
        candidates = {path: (path, path.with_name(f"{path.stem}-0{path.suffix}")) for path in expected}
        before = {c: _stamp(c) for pair in candidates.values() for c in pair}
        done = paste(block, folder, env)
        assert done.returncode == 0, f"README block at line {block.line} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        for path, pair in candidates.items():
            assert any(_stamp(c) not in (None, before[c]) for c in pair), (
                f"README block at line {block.line}: {path.relative_to(folder)} was not written")
        ran += 1
    assert ran >= 8
