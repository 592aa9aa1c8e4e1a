"""A minimal name → object registry (one per kind: quantizers, observers, methods)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from ptq_bench.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes or functions; unknown names raise :class:`ConfigError` listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def values(self) -> list[T]:
        return [self._items[name] for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._items
