"""The benchmark page keeps what each benchmark wrote: bench.run's page rewrite keeps every
bench.NAME section another benchmark put there by its own run (sink_versus, shortcuts, large_bodies)."""

from __future__ import annotations

from pathlib import Path

from bench import report, run
from bench.scenarios import kept_sections, write_section


def test_a_section_is_written_once_and_replaced_by_the_next_run(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nother text\n")
    write_section(page, "sink_versus", ["## The sink", "", "first run"])
    write_section(page, "shortcuts", ["## Shortcuts", "", "a figure"])
    write_section(page, "sink_versus", ["## The sink", "", "second run"])
    text = page.read_text()
    assert text.count("## The sink") == 1 and "second run" in text and "first run" not in text
    assert "other text" in text and [s.split(":")[0] for s in kept_sections(text)] == [
        "<!-- bench.sink_versus",
        "<!-- bench.shortcuts",
    ]


def test_the_run_page_keeps_every_other_benchmarks_section(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    write_section(page, "large_bodies", ["## Large bodies", "", "peak RSS 100 MB"])
    write_section(page, "sink_versus", ["## The sink", "", "ratio 0.8"])
    report.write_markdown(page, ["bench, 2026-12-06 18:00 UTC", "a line"], "python -m bench.run", run.__doc__ or "")
    report.rewrite_markdown(page, run.__doc__ or "")
    text = page.read_text()
    assert "peak RSS 100 MB" in text and "ratio 0.8" in text and "a line" in text
    assert len(kept_sections(text)) == 2
