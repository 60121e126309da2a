"""The package's parts import only the parts listed below them in qwen_vl/__init__.py's docstring."""

import ast
import re
from pathlib import Path

import qwen_vl

PACKAGE = Path(qwen_vl.__file__).parent


def layers() -> list[str]:
    """The parts, top to bottom, as the docstring lists them."""
    return re.findall(r"^    (\w+)(?:/|\.py)\s", qwen_vl.__doc__, flags=re.MULTILINE)


def part_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "qwen_vl" else None


def imported(path: Path) -> set[str]:
    """The qwen_vl modules a file imports, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_docstring_lists_every_part():
    on_disk = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    on_disk |= {p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("_")}
    assert set(layers()) == on_disk


def test_no_part_imports_a_part_listed_above_it():
    order = layers()
    upward = []
    for path in PACKAGE.rglob("*.py"):
        part = part_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if part not in order:
            continue
        for module in imported(path):
            other = part_of(module)
            if other in order and other != part and order.index(other) < order.index(part):
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, upward
