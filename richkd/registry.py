"""A tiny name -> factory registry whose errors suggest the nearest name and list the known ones, and the lazy
exports of a package (each name loads its module on first use)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, Iterator, Mapping, TypeVar

from richkd.schema import suggest

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj
        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}{suggest(name, self.names())} (known: "
                           f"{', '.join(self.names())})")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self._items)


def lazy_exports(package: str, homes: Mapping[str, tuple]) -> tuple[Callable, list[str]]:
    """A package's `__getattr__` (PEP 562) and `__all__` for {module: names}: a name imports its module when first
    read, so importing the package stays light."""
    home = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
    return __getattr__, sorted(home)
