"""The docs run as written: every ```bash, ```sh, ```console and ```python block of README.md and docs/*.md.

Each page runs in a fresh directory (the checkout's files linked in, its own `.env` made as
scripts/setup.sh makes it: a new key, a database of its own named ``login_etl_…``) against the
embedded stack: real LocalStack, real PostgreSQL, moto's KMS. Its blocks run in page order, each in
a new shell with only PATH (the virtual environment first), HOME and LANG set: the environment the
docs assume. A ```console block is ``$ command`` lines, each followed by the output the page shows
(stdout and stderr, as a terminal shows them; ``…`` stands for any text within a line): the test
fails when a command fails or its output no longer matches. Other blocks fail when any command in
them fails (``bash -e -o pipefail``; a ```python block runs with the venv's python).

A block that cannot run here (Docker, Kubernetes, Lambda, real AWS, a synopsis with placeholders)
is preceded by the line ``<!-- docs-run: skip (reason) -->``.

Adaptation, and the only one: each page gets a queue of its own, so ``login-queue`` in the page's
commands and outputs is read as that queue's name (pages run in parallel on one LocalStack).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from pii.masking import generate_key

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"^<!-- docs-run: skip \(.+\) -->$")
FENCE = re.compile(r"^(\s*)```(bash|sh|console|python)\s*$")
BLOCK_TIMEOUT_SECONDS = 300
QUEUE_ACCOUNT = "000000000000"
# Not linked into a page's directory: what a checkout's own runs leave there.
LEFT_OUT = (".env", ".git", ".stack", "build")
# Roles the least-privilege example creates (cluster-wide): dropped after the page if it made them.
EXAMPLE_ROLES = ("etl", "alice")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it starts, its language and its text (dedented)."""

    page: Path
    line: int
    language: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.language})"


def blocks(page: Path) -> list[Block]:
    """The page's shell, console and Python blocks not marked to be skipped, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent = len(fence.group(1))
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        previous = lines[index - 1].strip() if index else ""
        if not SKIP_MARK.match(previous):
            body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[index + 1 : end])
            found.append(Block(page, index + 1, fence.group(2), body + "\n"))
        index = end + 1
    return found


def test_every_skip_mark_stands_right_before_a_block_and_gives_a_reason() -> None:
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if line.lstrip().startswith("<!--") and "docs-run" in line:
                assert SKIP_MARK.match(line.strip()), f"{page.name}:{number}: expected <!-- docs-run: skip (reason) -->"
                assert number < len(lines) and lines[number].lstrip().startswith("```"), (
                    f"{page.name}:{number}: the mark must stand on the line right before the block"
                )


@pytest.fixture
def page_dir(tmp_path: Path, pg_admin_url: str, sqs_client, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory holding the checkout's files, an `.env` of its own, a queue and a database."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".env", ".git", ".stack", "build") and not entry.name.startswith(
            ("keyset", "masking_key")
        ):
            (checkout / entry.name).symlink_to(entry)
    suffix = uuid.uuid4().hex[:10]
    queue = f"docs-{suffix}"
    dlq_url = sqs_client.create_queue(QueueName=f"{queue}-dlq")["QueueUrl"]
    dlq_arn = sqs_client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs_client.create_queue(
        QueueName=queue,
        Attributes={"RedrivePolicy": f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"10"}}'},
    )["QueueUrl"]
    database = f"login_etl_docs{suffix}"
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {database}")
        cur.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(EXAMPLE_ROLES),))
        roles_before = {name for (name,) in cur.fetchall()}
    text = (ROOT / ".env.example").read_text()
    text = re.sub(r"(?m)^MASKING_KEY=.*$", "MASKING_KEY=" + generate_key(), text, count=1)
    text = re.sub(r"(?m)^(DATABASE_URL=.*/)postgres$", lambda m: m.group(1) + database, text, count=1)
    text = text.replace(f"{QUEUE_ACCOUNT}/login-queue", f"{QUEUE_ACCOUNT}/{queue}")
    env_file = checkout / ".env"
    env_file.write_text(text)
    env_file.chmod(0o600)
    request.node.queue_name = queue
    request.node.roles_before = roles_before
    try:
        yield checkout
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            for role in EXAMPLE_ROLES:
                if role not in roles_before:
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                    if cur.fetchone():
                        cur.execute(f"DROP ROLE {role}")
        admin.close()
        for url in (queue_url, dlq_url):
            sqs_client.delete_queue(QueueUrl=url)


def shell_env(home: Path) -> dict[str, str]:
    """What a reader's shell has, as far as the docs assume: the venv active, nothing of ours set."""
    return {
        "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


def run(
    command: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BLOCK_TIMEOUT_SECONDS,
    )


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether the output is the one shown, line for line, `…` standing for any text within a line."""
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual, strict=True):
        pattern = ".*".join(re.escape(part) for part in want.rstrip().split("…"))
        if not re.fullmatch(pattern, got.rstrip()):
            return False
    return True


def run_console(block: Block, cwd: Path, env: dict[str, str]) -> None:
    """Each `$ command` of the block, its output compared with the lines that follow it."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    assert steps, f"{block}: a console block without a `$ ` command"
    for command, expected in steps:
        while expected and not expected[-1].strip():
            expected.pop()
        result = run(["bash", "-o", "pipefail", "-c", command], cwd, env)
        actual = result.stdout.rstrip("\n").splitlines()
        assert matches(expected, actual), (
            f"{block}: `{command}` (exit {result.returncode}) printed\n{result.stdout}\nbut the page shows\n"
            + "\n".join(expected)
        )


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_block_of_the_page_runs_as_written(page: Path, page_dir: Path, request: pytest.FixtureRequest) -> None:
    queue = request.node.queue_name
    env = shell_env(page_dir.parent / "home")
    (page_dir.parent / "home").mkdir()
    page_blocks = blocks(page)
    if {"etl", "alice"} & request.node.roles_before and any("CREATE ROLE etl" in b.text for b in page_blocks):
        pytest.fail(f"roles {sorted(request.node.roles_before)} exist already: the roles example would fail")
    for block in page_blocks:
        text = block.text.replace(f"{QUEUE_ACCOUNT}/login-queue", f"{QUEUE_ACCOUNT}/{queue}")
        block = Block(block.page, block.line, block.language, text)
        if block.language == "console":
            run_console(block, page_dir, env)
            continue
        command = ["python", "-"] if block.language == "python" else ["bash", "-e", "-o", "pipefail", "-s"]
        result = run(command, page_dir, env, stdin=block.text)
        assert result.returncode == 0, f"{block} failed (exit {result.returncode}):\n{result.stdout[-4000:]}"
