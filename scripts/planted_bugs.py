"""Plant the bugs of issue 27 one at a time in a scratch copy of the tree and run the unit tests there.

Each bug is a text replacement in one file. A bug is *caught* when the unit tests fail with it
planted. Usage (from the repository root, with .venv made):

    python scripts/planted_bugs.py                 # every bug, SIM_SEEDS=300 (as `make unit`)
    python scripts/planted_bugs.py no-track        # one bug
    python scripts/planted_bugs.py --list
    python scripts/planted_bugs.py --tests tests/unit/test_simulation.py   # the simulation alone

Exit code 0 when every bug tried was caught, 1 otherwise. The scratch copy is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (file, text as it is, text with the bug, what the bug does)
BUGS: dict[str, tuple[str, str, str, str]] = {
    "no-track": (
        "etl/pipeline.py",
        "self.keeper.track(messages)",
        "pass  # planted: the keeper never tracks",
        "the loop never tracks a message for extension (the keeper's `track` call removed)",
    ),
    "extend-to-zero": (
        "aws/visibility.py",
        "self._extend(chunk, self.timeout)",
        "self._extend(chunk, 0)",
        "the keeper extends with VisibilityTimeout=0 (every message in hand handed back at once)",
    ),
    "no-retry-budget": (
        "etl/pipeline.py",
        "budget_seconds=None if options.follow else options.retry_budget_seconds",
        "budget_seconds=None if options.follow else 0.0",
        "a drain gives up at its first transient error (retry budget 0)",
    ),
}


def plant(tree: Path, name: str) -> None:
    path, before, after, _ = BUGS[name]
    source = (tree / path).read_text()
    if source.count(before) != 1:
        raise SystemExit(f"{name}: {path} no longer holds exactly one {before!r}; update scripts/planted_bugs.py")
    (tree / path).write_text(source.replace(before, after))


def run(name: str, seeds: str, tests: list[str]) -> bool:
    """Plant `name` in a scratch copy; True when the unit tests fail there (the bug is caught)."""
    with tempfile.TemporaryDirectory(prefix=f"planted-{name}-") as scratch:
        tree = Path(scratch) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".*_cache"))
        (tree / ".venv").symlink_to(ROOT / ".venv")
        plant(tree, name)
        env = {**os.environ, "SIM_SEEDS": seeds, "PYTEST_ADDOPTS": '-m "not static" -p no:cacheprovider'}
        env.pop("SIM_SEED", None)
        result = subprocess.run(
            ["bash", "scripts/test.sh", *tests, "-q", "-x", "--no-header", "-rN"],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        tail = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
        # The simulation's count of failing seeds, and the first failure of each failing test.
        seen = [
            line[1:].strip() for line in result.stdout.splitlines() if line.startswith("E") and "seeds failed" in line
        ]
        seen += [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
        print(f"{name}: {'CAUGHT' if result.returncode else 'NOT CAUGHT'} ({tail[0]})", flush=True)
        for line in dict.fromkeys(seen):
            print(f"    {line}")
        return result.returncode != 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bugs", nargs="*", metavar="BUG", help=f"bugs to plant (default: all): {', '.join(BUGS)}")
    parser.add_argument("--tests", nargs="+", default=["tests/unit"], help="test paths (default: tests/unit)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument("--seeds", default="300", help="SIM_SEEDS for the runs (default 300, as make unit)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (path, _, _, what) in BUGS.items():
            print(f"{name}\t{path}: {what}")
        return 0
    unknown = set(args.bugs) - set(BUGS)
    if unknown:
        parser.error(f"unknown bug(s) {sorted(unknown)}; --list shows them")
    caught = [run(name, args.seeds, args.tests) for name in args.bugs or BUGS]
    return 0 if all(caught) else 1


if __name__ == "__main__":
    sys.exit(main())
