"""An English corpus every machine with this project installed already has: the docstrings of installed
Python packages (the interpreter's standard library, torch, transformers, numpy, ... from PyPI), one
document per docstring, written as JSON lines for `wb data prepare --text-field text`. Nothing is downloaded.

    python -m gpu_workbench.parallel.tokens.corpus OUT.jsonl [--mb 10] [PACKAGE ...]
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

DEFAULT_PACKAGES = ["stdlib", "transformers", "torch", "numpy", "scipy", "pandas", "matplotlib", "ray", "sympy"]
MIN_CHARS = 200   # shorter docstrings are mostly signatures and one-liners


def package_root(name: str) -> Path | None:
    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    root = Path(sysconfig.get_paths()["purelib"]) / name
    return root if root.is_dir() else None


def docstrings(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield doc


def build(out: Path, megabytes: float, packages: list[str]) -> tuple[int, int]:
    """Write docstrings of `packages` to `out` (JSON lines) until `megabytes` MB; (documents, bytes)."""
    limit, n, size = int(megabytes * 1e6), 0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for name in packages:
            root = package_root(name)
            if root is None:
                continue
            for doc in docstrings(root):
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                n, size = n + 1, size + len(line.encode())
                if size >= limit:
                    return n, size
    return n, size


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    mb = float(argv[argv.index("--mb") + 1]) if "--mb" in argv else 10.0
    rest = [a for i, a in enumerate(argv[1:], 1) if a != "--mb" and argv[i - 1] != "--mb"]
    n, size = build(Path(argv[0]), mb, rest or DEFAULT_PACKAGES)
    if size < mb * 1e6:
        raise UserError(f"only {size / 1e6:.1f} MB of docstrings in {', '.join(rest or DEFAULT_PACKAGES)}")
    print(f"wrote {n} docstrings, {size / 1e6:.1f} MB, to {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
