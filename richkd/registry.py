"""A tiny name -> factory registry whose errors list the known names."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, TypeVar

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
        try:
            return self._items[name]
        except KeyError:
            hint = difflib.get_close_matches(name, list(self._items), n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{extra} Known: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
