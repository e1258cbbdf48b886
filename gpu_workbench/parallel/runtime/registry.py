"""A name -> object registry whose entries are imported on first use ("module:attribute"), so that listing
the names (config checks, `--help`) imports neither torch nor an optional engine. The recipes
(recipes/__init__.py) and the architectures (models/__init__.py) are two of them."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class LazyRegistry(Mapping):
    """`where`: name -> "module:attribute", a bare module name relative to `package`, a dotted one anywhere
    (a plug-in). `make(attribute, name)` turns what the module holds into the entry (default: itself)."""

    def __init__(self, where: dict[str, str], package: str, make: Callable[[Any, str], Any] | None = None):
        self._where, self._package, self._loaded = dict(where), package, {}
        self._make = make or (lambda obj, name: obj)

    def __getitem__(self, name: str) -> Any:
        if name not in self._where:
            raise KeyError(name)
        if name not in self._loaded:
            module, attribute = self._where[name].split(":")
            module = module if "." in module else f"{self._package}.{module}"
            self._loaded[name] = self._make(getattr(importlib.import_module(module), attribute), name)
        return self._loaded[name]

    def add(self, name: str, where: str) -> None:
        """Register `name` as "module:attribute" (a plug-in outside this package: a dotted module path)."""
        self._where[name] = where
        self._loaded.pop(name, None)

    def remove(self, name: str) -> None:
        self._where.pop(name, None)
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
