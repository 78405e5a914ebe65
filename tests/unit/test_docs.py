"""The documentation and the code agree (in the style of sqlite-utils' test_docs.py): every
subcommand, flag, environment variable and exit code the code has is documented, and every one
documented exists; every pointer to a section (a link's #anchor, README "Section", see "Section")
names a heading that is there.

What counts as documenting a flag: a code span or a code-block line `python main.py [SUB] … --flag`
(or one starting with the subcommand, `keygen --format tink`) documents it for that subcommand; a
code span that starts with the flag (`--receivers`) names one of main.py's flags. docs/CHANGELOG.md
is history and is not checked."""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import config
import main
from cli import exit_codes
from cli.parser import build_parser
from tests.source import names_read_from_env

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted(path for path in (ROOT / "docs").glob("*.md") if path.name != "CHANGELOG.md")]
# Read by boto3 / botocore themselves, documented in the configuration table all the same.
READ_BY_BOTO3 = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"}


def all_docs() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def section(path: Path, heading: str) -> str:
    """The text of a `## heading` section of a Markdown file."""
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


@functools.cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser as '' and each subcommand's by name."""
    top = build_parser()
    found = {"": top}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def subcommands() -> set[str]:
    return {name for name in parsers() if name}


def code_texts(path: Path) -> Iterator[str]:
    """Each line of a fenced code block, and each inline code span (whitespace collapsed), of a Markdown file."""
    text = path.read_text()
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
        yield from (line.split(" # ")[0] for line in block.splitlines())
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
        yield " ".join(span.split())


def _flags_in(words: list[str]) -> list[str]:
    return [m.group(1) for w in words if (m := re.match(r"\[?(--[a-z][a-z0-9-]*)", w))]


def command_uses(path: Path) -> Iterator[tuple[str, str | None, list[str]]]:
    """(text, subcommand, flags) for each `python main.py …` (or `SUBCOMMAND --flag …`) in a document's
    code. Flags written before the subcommand are main.py's own (subcommand ""); the word after
    `python main.py` that is not a flag is given as the subcommand, whether it exists or not."""
    for text in code_texts(path):
        found = list(re.finditer(r"(\bpython3? +(?:\S*/)?)?\bmain\.py\b", text))
        ends = [m.start() for m in found[1:]] + [len(text)] if found else []
        segments = [(bool(m.group(1)), text[m.end() : end]) for m, end in zip(found, ends, strict=True)]
        if not found and text.split(" ", 1)[0] in subcommands():
            segments = [(True, " " + text)]
        for invoked, segment in segments:
            words = re.split(r"(?<!\\)[|;)>]|&&", segment)[0].split()
            position = next((i for i, w in enumerate(words) if w in subcommands()), None)
            if position is None:
                if invoked and words and re.fullmatch(r"[a-z][a-z_-]*", words[0]):
                    yield text, words[0], []  # `python main.py WORD`: WORD must be a subcommand
                yield text, "", _flags_in(words)
            else:
                yield text, "", _flags_in(words[:position])
                yield text, words[position], _flags_in(words[position + 1 :])


def bare_flags(path: Path) -> Iterator[str]:
    """The flag a code span starts with (`--receivers`, `--log-format text|json`)."""
    for text in code_texts(path):
        if match := re.match(r"(--[a-z][a-z0-9-]*)", text):
            yield match.group(1)


def test_every_subcommand_written_exists_and_every_subcommand_is_documented() -> None:
    written = {(path.name, text, sub) for path in DOCS for text, sub, _ in command_uses(path) if sub}
    unknown = sorted(f"{name}: `{text}`" for name, text, sub in written if sub not in subcommands())
    assert unknown == [], "documented subcommands that do not exist"
    assert subcommands() - {sub for _, _, sub in written} == set(), "subcommands not documented"


def test_every_flag_written_with_a_command_exists_on_that_command() -> None:
    wrong = sorted(
        f"{path.name}: `{text}`: {flag} is not a flag of {sub or 'main.py'}"
        for path in DOCS
        for text, sub, used in command_uses(path)
        if sub in parsers()
        for flag in used
        if flag not in flags(parsers()[sub]) | {"--help"}
    )
    assert wrong == []


def test_every_flag_written_alone_exists() -> None:
    known = set().union(*(flags(parser) for parser in parsers().values())) | {"--help"}
    unknown = sorted(f"{path.name}: {flag}" for path in DOCS for flag in bare_flags(path) if flag not in known)
    assert unknown == [], "flags in the docs that main.py does not have (write the command with them)"


@pytest.mark.parametrize("command", sorted(parsers()))
def test_every_flag_is_documented_with_its_command(command: str) -> None:
    documented = {flag for path in DOCS for _, sub, used in command_uses(path) if sub == command for flag in used}
    if command == "":  # the tuning flags are listed alone in docs/operations.md
        documented |= {flag for path in DOCS for flag in bare_flags(path)}
    missing = sorted(flags(parsers()[command]) - documented)
    assert not missing, f"flags of {command or 'main.py'} not documented with it: {missing}"


def test_every_environment_variable_read_is_in_the_configuration_table_and_back() -> None:
    table = section(ROOT / "README.md", "Configuration")
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", table, re.M))
    documented |= set(
        re.findall(
            r"`([A-Z][A-Z0-9_]+)`",
            "\n".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `")),
        )
    )
    read = names_read_from_env()
    assert read - documented == set(), "variables the code reads but the README's table does not list"
    assert documented - read - READ_BY_BOTO3 == set(), "variables the table lists but nothing reads"


def test_the_readme_names_every_key_source_and_no_other() -> None:
    row = next(
        line for line in section(ROOT / "README.md", "Configuration").splitlines() if "**Exactly one** of" in line
    )
    named = re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("**Exactly one** of", 1)[1].split("must be set", 1)[0])
    assert sorted(named) == sorted(config.KEY_SOURCES)


def test_the_exit_code_table_is_the_codes_main_has() -> None:
    table = section(ROOT / "docs" / "operations.md", "Exit codes")
    documented = dict(re.findall(r"^\| (\d+|128\+N) \| (.*) \|$", table, re.M))
    assert documented == {
        **{str(code): meaning for code, meaning in exit_codes.EXIT_CODES.items()},
        f"{exit_codes.EXIT_SIGNAL_BASE}+N": exit_codes.EXIT_SIGNAL_MEANING,
    }


def test_help_lists_exactly_the_exit_code_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.main(["--help"])
    epilog = capsys.readouterr().out.split("exit codes (docs/operations.md):", 1)[1]
    listed = dict(re.findall(r"^  (\d+|128\+N) +(.*?)(?=^  \S|\Z)", epilog, re.M | re.S))
    table = section(ROOT / "docs" / "operations.md", "Exit codes")
    documented = dict(re.findall(r"^\| (\d+|128\+N) \| (.*) \|$", table, re.M))
    assert {code: " ".join(text.split()) for code, text in listed.items()} == documented


def test_no_document_links_to_a_file_that_does_not_exist() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


# Files whose text may point to a section: every text file of the repository but the history.
_SKIPPED_DIRS = {
    ".git",
    ".venv",
    ".stack",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "node_modules",
}
_TEXT_SUFFIXES = {".md", ".py", ".yml", ".yaml", ".toml", ".sh", ".txt", ".sql", ".env", ".example", ".json", ".cfg"}


def text_files() -> Iterator[Path]:
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in files:
            path = Path(directory) / name
            if path == ROOT / "docs" / "CHANGELOG.md" or path == Path(__file__):
                continue
            if path.suffix in _TEXT_SUFFIXES or name in {"Makefile", "Dockerfile", ".env.example"}:
                yield path


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _plain(title: str) -> str:
    return " ".join(title.replace("`", "").split()).rstrip(".:").lower()


def headings(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(path):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def _document(source: Path, target: str) -> Path | None:
    for base in (source.parent, ROOT, ROOT / "docs"):
        if (base / target).is_file():
            return (base / target).resolve()
    return None


# `README "Section"`, `README, "Section"`, `docs/x.md ("Section")`; `see "Section"`; `the "Section" section`.
_NAMED_IN = re.compile(r"\b((?:[\w./-]*/)?[\w.-]+\.md|README)(?:'s)?,? \(?[\"“]([^\"”]{1,80})[\"”]")
_SEE = re.compile(r"\b[Ss]ee (?:the )?[\"“]([^\"”]{1,80})[\"”]|[\"“]([^\"”]{1,80})[\"”] section\b")


def section_pointers() -> Iterator[tuple[str, Path | None, str]]:
    """(where, the document pointed to or None for any, the section title or #anchor) for every pointer."""
    for path in text_files():
        text = re.sub(r"\b[a-z]+://\S+", "", path.read_text(errors="replace"))  # another site's anchors
        # a comment continued over lines: "# (README, "Least-privilege\n# database set-up")"
        joined = re.sub(r"\s*\n\s*(?:#+|//|--)?\s*", " ", text)
        where = str(path.relative_to(ROOT))
        if path.suffix == ".md":  # [text](#anchor), within the page
            for anchor in re.findall(r"\]\(#([^)\s]+)\)", text):
                yield where, path.resolve(), "#" + anchor
        for target, anchor in re.findall(r"\b((?:[\w./-]*/)?[\w.-]+\.md)#([\w-]+)", text):
            yield where, _document(path, target), "#" + anchor
        for target, title in _NAMED_IN.findall(joined):
            document = ROOT / "README.md" if target == "README" else _document(path, target)
            yield where, document, title
        for see, named in _SEE.findall(joined):
            yield where, path.resolve() if path.suffix == ".md" else None, see or named


def test_every_pointer_to_a_section_names_a_heading_that_is_there() -> None:
    every = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for where, document, pointed in section_pointers():
        if document is None and pointed.startswith("#"):
            broken.append(f"{where}: {pointed} in a file that does not exist")
            continue
        candidates = [document] if document is not None else every
        if pointed.startswith("#"):
            found = any(pointed[1:] in anchors(doc) for doc in candidates)
        else:
            found = any(_plain(pointed) in {_plain(h) for h in headings(doc)} for doc in candidates)
        if not found:
            broken.append(f"{where}: {pointed!r} is not a heading of {document.name if document else 'any document'}")
    assert broken == []


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_variable_the_lambda_handler_reads_is_in_its_configuration_table_and_back() -> None:
    table = section(ROOT / "docs" / "lambda.md", "Configuration")
    documented = set(
        re.findall(
            r"`([A-Z][A-Z0-9_]+)`",
            "\n".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `")),
        )
    )
    assert names_read_from_env(("lambda_handler.py",)) - documented == set(), "read but not in docs/lambda.md"
    assert documented - names_read_from_env(("lambda_handler.py", "config.py")) == set(), "listed but nothing reads"


def test_the_documented_compose_up_for_a_drain_on_the_host_waits_until_the_services_are_healthy() -> None:
    # `python main.py` exits 3 at once while LocalStack is starting or its init hook has not yet
    # created login-queue; `up -d` returns before that, `up -d --wait` only once both are healthy
    # (tests/integration/test_docker_runtime.py runs this path).
    compose_comments = "\n".join(
        line for line in (ROOT / "docker-compose.yml").read_text().splitlines() if line.startswith("#")
    )
    for text in (all_docs(), compose_comments):
        for command in re.findall(r"docker compose (?!--profile)[^`#\n]*\bup\b[^`#\n]*", text):
            assert "--wait" in command, command
