"""The documentation stays true: its commands parse, its package map matches the code.

Every `elfctl ...` line in a shell block of README.md or docs/*.md (also the
`accelerate launch ... -m elfctl ...` and `torchrun ... -m elfctl ...` forms) goes
through the CLI's own parser without doing any work, so a renamed or removed flag fails
here rather than in a user's terminal. Placeholders such as RUN_DIR are fine: they only
have to parse.

The package map in README.md is the first line of each module's docstring. When a module
is added, renamed or redocumented, print the map again with `python tests/test_docs.py`.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer

import elfctl.cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _shell_blocks(path: Path):
    """(first line number, text) of each fenced block in a shell language."""
    lang, start, lines = None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence and lang is None:
            lang, start, lines = fence.group(1), number + 1, []
        elif fence:
            if lang in SHELL_LANGS:
                yield start, "\n".join(lines)
            lang = None
        elif lang is not None:
            lines.append(line)


def _logical_lines(start: int, text: str):
    """Lines with backslash continuations joined, each with its first line number."""
    pending, first = "", start
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            first = start + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""


def _elfctl_args(tokens: list[str]) -> list[str] | None:
    """The arguments given to elfctl by one shell command, or None if it runs no elfctl."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if Path(tokens[0]).name == "elfctl":
        return tokens[1:]
    if Path(tokens[0]).name in {"accelerate", "torchrun", "python", "python3"}:
        for i, token in enumerate(tokens):
            if token == "elfctl" and (tokens[i - 1] in {"-m", "--no_python"}):
                return tokens[i + 1 :]
    return None


def _split_commands(line: str) -> list[list[str]]:
    """One logical shell line -> its simple commands (split on &&, ||, ;, |), comments cut."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def documented_commands():
    found = []
    for path in DOCS:
        for start, block in _shell_blocks(path):
            for number, line in _logical_lines(start, block):
                for tokens in _split_commands(line):
                    args = _elfctl_args(tokens)
                    if args is not None:
                        where = f"{path.relative_to(ROOT)}:{number}"
                        found.append(pytest.param(args, id=where))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_elfctl_commands_at_all():
    # Guards the extraction itself: an empty list would make the test below vacuous.
    assert len(COMMANDS) >= 50


@pytest.mark.parametrize("args", COMMANDS)
def test_every_documented_command_parses(args):
    group = typer.main.get_command(elfctl.cli.app)
    if args and args[0] == "--debug":
        args = args[1:]
    if args in ([], ["--help"]):
        return
    name, rest = args[0], args[1:]
    command = group.commands.get(name)
    assert command is not None, f"elfctl has no command {name!r}"
    try:
        command.make_context(name, list(rest))
    except Exception as e:  # typer vendors its own click: match by behaviour, not class
        if type(e).__name__ == "Exit" and getattr(e, "exit_code", None) == 0:
            return  # --help: printed, then exit 0
        if hasattr(e, "format_message"):
            pytest.fail(f"elfctl {' '.join(args)}: {e.format_message()}")
        raise


# -- the package map ---------------------------------------------------------------------


def module_summaries() -> dict[str, str]:
    """elfctl/... path -> the first line of its docstring, for every module that has one."""
    summaries = {}
    for path in sorted((ROOT / "elfctl").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if doc:
            summaries[path.relative_to(ROOT).as_posix()] = doc.strip().splitlines()[0]
    return summaries


def render_map(summaries: dict[str, str]) -> str:
    """The README's map: a package's line, then its modules indented under it."""
    width = max(len(Path(p).name) for p in summaries) + 4
    by_package: dict[str, list[str]] = {}
    for path in summaries:
        by_package.setdefault(str(Path(path).parent), []).append(path)
    lines = []
    for package in sorted(by_package, key=lambda p: (p != "elfctl", p)):
        paths = sorted(by_package[package], key=lambda p: (not p.endswith("__init__.py"), p))
        for path in paths:
            name = Path(path).name
            if name == "__init__.py":
                lines.append(f"{package}/".ljust(width + 2) + summaries[path])
            else:
                lines.append(f"  {name}".ljust(width + 2) + summaries[path])
    return "\n".join(lines)


def readme_map() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- package map -->\n```text\n(.*?)\n```", text, re.S)
    assert match, "README.md has no package map (a ```text block after <!-- package map -->)"
    return match.group(1)


def test_readme_package_map_is_each_modules_docstring():
    assert readme_map() == render_map(module_summaries()), (
        "README.md's package map is out of date: print it again with "
        "`python tests/test_docs.py` and paste it under <!-- package map -->"
    )


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


# -- links between the pages ---------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lowercased, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"^#+\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


# Pages that other branches of the current work add, linked from here already: none now.
# Name a page here while its branch is unmerged; empty it once the page is on main.
PAGES_BEING_WRITTEN: set[str] = set()


def test_every_link_between_the_pages_leads_somewhere():
    broken = []
    for doc in DOCS:
        prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(prose):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists() and dest.name in PAGES_BEING_WRITTEN:
                continue
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _heading_anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- nothing that only one machine or one team has -----------------------------------------

# Written so that this file does not match itself.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|root|home)/\w")
PRIVATE_FILES = re.compile(r"\b(?:ELF_SPEC|DESIGN|MEASURED)\.md\b")
SCANNED = ("README.md", "Makefile", "pyproject.toml", "docs", "elfctl", "presets", "tests", "bench")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json", ""}


def _project_text_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.is_file() and file.suffix in TEXT_SUFFIXES and "__pycache__" not in file.parts:
                yield file


def test_no_file_holds_an_absolute_path_of_a_machine():
    offenders = []
    for file in _project_text_files():
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "absolute paths of one machine:\n" + "\n".join(offenders)


def test_no_file_cites_documents_users_do_not_have():
    offenders = []
    for file in _project_text_files():
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if PRIVATE_FILES.search(line):
                offenders.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "cite docs/method.md or another docs/ page instead:\n" + "\n".join(
        offenders
    )


def test_the_path_check_would_catch_a_machine_path():
    assert MACHINE_PATH.search("see " + "/wo" + "rk/runs/tiny")
    assert MACHINE_PATH.search("--source=" + "/ro" + "ot/ckpt")
    assert not MACHINE_PATH.search("runs/tiny ~/jax_run/checkpoint_95000 (no room for /home/...)")


if __name__ == "__main__":
    sys.stdout.write(render_map(module_summaries()) + "\n")
