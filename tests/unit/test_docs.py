"""The documentation and the code agree (in the style of sqlite-utils' test_docs.py): every
subcommand, flag, environment variable and exit code the code has is documented, and every one
documented exists."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
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


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser as '' and each subcommand's by name."""
    top = main._build_parser()
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


def names_read_from_env(modules: tuple[str, ...] = ("config.py", "main.py")) -> set[str]:
    """Every NAME in `env.get("NAME")` / `env["NAME"]` / `os.environ...("NAME")` in the app's modules."""
    names: set[str] = set()
    for path in [ROOT / module for module in modules]:
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                key = node.args[0].value
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                key = node.slice.value
            if isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", key):
                names.add(key)
    return names


def test_every_subcommand_is_documented() -> None:
    text = all_docs()
    for name in parsers():
        if name:
            assert f"python main.py {name}" in text, f"subcommand {name!r} is not documented"


@pytest.mark.parametrize("command", sorted(parsers()))
def test_every_flag_is_documented(command: str) -> None:
    text = all_docs()
    missing = sorted(flag for flag in flags(parsers()[command]) if not re.search(rf"`[^`]*{flag}\b", text))
    assert not missing, f"flags of {command or 'main.py'} not documented: {missing}"


def test_every_flag_the_commands_section_names_exists() -> None:
    documented = set(re.findall(r"(--[a-z][a-z-]+)", section(ROOT / "docs" / "operations.md", "Commands")))
    known = set().union(*(flags(parser) for parser in parsers().values())) | {"--help"}
    assert documented - known == set(), "documented flags that do not exist"


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


def test_the_exit_code_table_is_the_codes_main_has() -> None:
    table = section(ROOT / "docs" / "operations.md", "Exit codes")
    documented = set(re.findall(r"^\| (\d+|128\+N) \|", table, re.M))
    assert documented == {*(str(code) for code in main.EXIT_CODES), f"{main.EXIT_SIGNAL_BASE}+N"}


def test_no_document_links_to_a_file_that_does_not_exist() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


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
