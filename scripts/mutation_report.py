"""The mutation report of `make mutation`: mutmut's results as Markdown (score, and each surviving
mutant with its diff), written to stdout. Run after `mutmut run`, from the repository root.

    python scripts/mutation_report.py > docs/mutation.md
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone

MUTMUT = [sys.executable, "-m", "mutmut"]


def results() -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, no tests, ...)."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status.strip()
    return found


def diff(name: str) -> str:
    shown = subprocess.run([*MUTMUT, "show", name], capture_output=True, text=True, check=False).stdout
    return "\n".join(line for line in shown.splitlines() if line.startswith(("+", "-", "@@")))[:1500]


def main(argv: list[str] | None = None) -> int:
    statuses = results()
    if not statuses:
        print("no mutmut results: run `make mutation` first", file=sys.stderr)
        return 1
    counts = Counter(statuses.values())
    tested = sum(n for status, n in counts.items() if status not in {"not checked", "skipped"})
    killed = counts["killed"] + counts["timeout"]
    modules = Counter(name.split(".x_")[0].split(".xǁ")[0] for name in statuses)
    print("# Mutation testing of the consume loop\n")
    print(f"Written by `scripts/mutation_report.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    print("How it is run, and the survivors explained: [testing](testing.md#mutation-testing).\n")
    print(f"**Score: {killed} of {tested} mutants killed ({100 * killed / max(1, tested):.0f}%).**\n")
    print("| status | mutants |\n|---|---|")
    for status, n in sorted(counts.items()):
        print(f"| {status} | {n} |")
    print("\n| module | mutants |\n|---|---|")
    for module, n in sorted(modules.items()):
        print(f"| `{module}` | {n} |")
    survivors = sorted(name for name, status in statuses.items() if status in {"survived", "no tests"})
    print(f"\n## Survivors ({len(survivors)})\n")
    for name in survivors:
        print(f"### `{name}` ({statuses[name]})\n\n```diff\n{diff(name)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
