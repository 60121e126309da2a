"""BENCHMARKS.md is shared by several benchmarks: each owns one `## ` section and
rewrites only that one, so a run of one benchmark keeps the others' figures. The flags every
server benchmark that writes a section shares are here too."""

import argparse
import sys
from pathlib import Path


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, the seed, the timeouts and where the results go."""
    parser.add_argument("--preset", default="small", help="checkpoint preset written to the cache (default small)")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint directory instead of --preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))


def parse_run_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed flags, with `argv` (for the report's command line); --model replaces --preset."""
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.model is not None:
        args.preset = None
    return args


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
