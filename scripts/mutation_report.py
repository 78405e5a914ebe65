"""The mutation report of `make mutation`: mutmut's results as Markdown, written to stdout. Run after
`mutmut run`, from the repository root.

    python scripts/mutation_report.py > docs/mutation.md
    python scripts/mutation_report.py --results saved.txt > docs/mutation.md

`--results`: the statuses from a saved `mutmut results --all true` output instead of mutmut's
(when mutants/ is gone; the survivors' diffs are then not shown).

Per module: how many mutants were checked (a module none of whose mutants ran is marked "not run",
never scored), killed, explained and left. A survivor is explained in docs/mutation-equivalent.md
(a table: mutant name, kind, why no test kills it); the others are listed with their diff, to be
killed by a test or explained there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

MUTMUT = [sys.executable, "-m", "mutmut"]
EXPLAINED = Path(__file__).resolve().parents[1] / "docs" / "mutation-equivalent.md"
KILLED = {"killed", "timeout"}
SURVIVED = {"survived", "no tests"}
NOT_RUN = {"not checked", "skipped"}


def results(saved: Path | None = None) -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, no tests, ...), from mutmut or `saved`."""
    if saved is not None:
        out = saved.read_text()
    else:
        out = subprocess.run([*MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status.strip()
    return found


def explanations(path: Path = EXPLAINED) -> dict[str, tuple[str, str]]:
    """mutant name -> (kind, reason), from the rows `| `name` | kind | reason |` of the file."""
    found = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = re.fullmatch(r"\|\s*`([^`]+__mutmut_\d+)`\s*\|([^|]*)\|(.*)\|\s*", line)
            if row:
                found[row[1]] = (row[2].strip(), row[3].strip())
    return found


def module_of(name: str) -> str:
    return name.split(".x_")[0].split(".xǁ")[0]


def diff(name: str) -> str:
    shown = subprocess.run([*MUTMUT, "show", name], capture_output=True, text=True, check=False).stdout
    lines = "\n".join(line for line in shown.splitlines() if line.startswith(("+", "-", "@@")))[:1500]
    return lines or "(diff not available: mutants/ is gone; `mutmut show` it after a run)"


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "—"


def count_per_module(statuses: dict[str, str], explained: dict[str, tuple[str, str]]) -> dict[str, Counter[str]]:
    """Per module: mutants, checked, killed, explained, left and other (neither killed nor explained)."""
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in statuses.items():
        counts = per_module[module_of(name)]
        counts["mutants"] += 1
        if status in NOT_RUN:
            continue
        counts["checked"] += 1
        if status in KILLED:
            counts["killed"] += 1
        elif status in SURVIVED:
            counts["explained" if name in explained else "left"] += 1
        else:
            counts["other"] += 1  # suspicious, segfault, ...: neither killed nor explained
    return per_module


def print_module_table(per_module: dict[str, Counter[str]]) -> None:
    print("| module | mutants | checked | killed | explained | left | score (killed) | killed or explained |")
    print("|---|---|---|---|---|---|---|---|")
    for module, c in sorted(per_module.items()):
        if not c["checked"]:
            print(f"| `{module}` | {c['mutants']} | not run | | | | | |")
            continue
        partial = "" if c["checked"] == c["mutants"] else " (partly run)"
        print(
            f"| `{module}` | {c['mutants']} | {c['checked']}{partial} | {c['killed']} | {c['explained']} | "
            f"{c['left'] + c['other']} | {percent(c['killed'], c['checked'])} | "
            f"{percent(c['killed'] + c['explained'], c['checked'])} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="a saved `mutmut results --all true` output")
    args = parser.parse_args(argv)
    statuses = results(args.results)
    if not statuses:
        print("no mutmut results: run `make mutation` first", file=sys.stderr)
        return 1
    explained = explanations()
    per_module = count_per_module(statuses, explained)
    total = sum(per_module.values(), Counter())
    settled = total["killed"] + total["explained"]
    print("# Mutation testing of the consume loop\n")
    print(f"Written by `scripts/mutation_report.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    print("How it is run: [testing](testing.md#mutation-testing); survivors explained in")
    print("[mutation-equivalent.md](mutation-equivalent.md).\n")
    print(
        f"**Score over the modules run: {total['killed']} of {total['checked']} mutants killed "
        f"({percent(total['killed'], total['checked'])}); killed or explained: "
        f"{settled} ({percent(settled, total['checked'])}).**\n"
    )
    print_module_table(per_module)
    print("\n| status | mutants |\n|---|---|")
    for status, n in sorted(Counter(statuses.values()).items()):
        print(f"| {status} | {n} |")
    left = sorted(
        name
        for name, status in statuses.items()
        if status not in NOT_RUN | KILLED and not (status in SURVIVED and name in explained)
    )
    print(f"\n## Survivors not yet killed or explained ({len(left)})\n")
    for name in left:
        print(f"### `{name}` ({statuses[name]})\n\n```diff\n{diff(name)}\n```\n")
    kept = sorted(name for name, status in statuses.items() if status in SURVIVED and name in explained)
    print(f"## Survivors explained ({len(kept)})\n")
    if kept:
        print("| mutant | kind | why no test kills it |\n|---|---|---|")
        for name in kept:
            kind, reason = explained[name]
            print(f"| `{name}` | {kind} | {reason} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
