"""BENCHMARKS.md is shared by several benchmarks: each owns one `## ` section and
rewrites only that one, so a run of one benchmark keeps the others' figures."""

from pathlib import Path


def replace_section(path: Path, title: str, lines: list[str]) -> None:
    """Put `## {title}` and `lines` in place of that section of `path` (or at its end)."""
    heading = f"## {title}"
    old = path.read_text().splitlines() if path.exists() else ["# Benchmarks"]
    new = [heading, "", *lines, ""]
    if heading in old:
        start = old.index(heading)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        old[start:end] = new
    else:
        old += ["", *new] if old and old[-1] else new
    path.write_text("\n".join(old).rstrip("\n") + "\n")
