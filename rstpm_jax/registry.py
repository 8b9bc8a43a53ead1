"""Registries of named parts (losses, map distances, fusion rules), big_vision style.

A part is registered by decorator in any module, found by the name a config gives, and
bound to keyword arguments from the config in a hashable way, so jitted functions that
close over a bound part stay cached across categories. A module of the user's own is
imported before a run when ``config.plugins`` names it. Names are unique: registering a
second function under a taken name is an error that names both.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def hashable(value: Any) -> Any:
    """``value`` with dicts (and ConfigDicts) as sorted item tuples and lists as tuples."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(hashable(v) for v in value)
    hash(value)  # raises TypeError for anything else that cannot be a cache key
    return value


@dataclasses.dataclass(frozen=True)
class Bound:
    """A registered function with keyword arguments; equal (and hashing equal) by value."""

    name: str
    fn: Callable[..., Any]
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **dict(self.kwargs), **kwargs)


class Registry:
    """Functions of one kind by name; ``config_key`` names the config entry that selects one."""

    def __init__(self, kind: str, config_key: str):
        self.kind, self.config_key = kind, config_key
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[Callable], Callable]:
        """Decorator: register the function under ``name`` (taken names are refused unless
        ``replace``; registering the very same function again is a no-op)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} needs a non-empty string name, got {name!r}.")

        def wrap(fn: Callable) -> Callable:
            old = self._entries.get(name)
            if old is not None and old is not fn and not replace:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {_where(old)}; "
                    f"{_where(fn)} registers it again. Pick another name (or pass replace=True).")
            self._entries[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ValueError(
                f"Unknown {self.config_key} {name!r}; registered: {self.names()}. A {self.kind} "
                "of your own must be registered in a module that config.plugins names.")
        return self._entries[name]

    def bind(self, name: str, kwargs: Mapping[str, Any] | None = None, **defaults: Any) -> Bound:
        """The function ``name`` with ``kwargs`` (from the config) over ``defaults``, hashable."""
        fn = self.get(name)
        merged = {**defaults, **dict(kwargs or {})}
        try:
            frozen = hashable(merged)
        except TypeError as e:
            raise ValueError(f"{self.config_key} {name!r}: its arguments {merged} must be numbers, "
                             f"strings, booleans or lists/dicts of them ({e}).") from e
        return Bound(name, fn, frozen)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def import_plugins(modules: str | Iterable[str] | None) -> list[str]:
    """Import the modules ``config.plugins`` names (comma-separated string or a list)."""
    if not modules:
        return []
    names = [m.strip() for m in (modules.split(",") if isinstance(modules, str) else modules)]
    names = [m for m in names if m]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"config.plugins: cannot import module {name!r} ({e}). Put it on "
                             "PYTHONPATH (or in the folder you run from).") from e
    return names
