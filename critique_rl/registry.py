"""One registry type for every extension point: tasks, reward functions, gates, advantage estimators, reward
aggregators, loss aggregations, policy losses, memory abstractions, environments, rollout engines and critic
backends.

A :class:`Registry` is a ``dict`` from name to entry that refuses a second entry under a name it holds (a plugin
that silently replaced a built-in would change a run without a word). Config checks, error messages and CLI
choices read the names from it (:meth:`Registry.names`, :meth:`Registry.unknown`), so a registered entry is
accepted everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from critique_rl.errors import ConfigError, UserError

T = TypeVar("T")


class DuplicateNameError(UserError):
    """A second registration under a name the registry already holds."""


class Registry(dict[str, T], Generic[T]):
    """``name -> entry``; ``what`` says what the entries are (used in errors), ``field`` the config field that
    names one (e.g. ``advantage_estimator``)."""

    def __init__(self, what: str, field: str | None = None, entries: dict[str, T] | None = None) -> None:
        super().__init__()
        self.what = what
        self.field = field
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a name already held by another entry raises :class:`DuplicateNameError`
        (registering the identical object again is a no-op)."""
        if not isinstance(name, str) or not name:
            raise UserError(f"{self.what}: a registered name must be a non-empty string, not {name!r}")
        if dict.__contains__(self, name):
            if dict.__getitem__(self, name) is entry:  # the same entry again (a module imported twice): no change
                return entry
            raise DuplicateNameError(f"{self.what} {name!r} is already registered ({_describe(self[name])}); "
                                     "choose another name (registries refuse duplicates)")
        dict.__setitem__(self, name, entry)
        return entry

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def setdefault(self, name: str, entry: Any = None) -> T:  # type: ignore[override]
        return self[name] if name in self else self.register(name, entry)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for name, entry in dict(*args, **kwargs).items():
            self.register(name, entry)

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` registers the decorated function or class."""

        def deco(entry: T) -> T:
            return self.register(name, entry)

        return deco

    def unregister(self, name: str) -> T:
        """Remove and return ``name``'s entry (tests and plugins that register temporarily)."""
        return dict.pop(self, name)

    def names(self) -> list[str]:
        """The registered names, sorted (config error messages and CLI choices)."""
        return sorted(self)

    def get_or_raise(self, name: str, field: str | None = None) -> T:
        """The entry of ``name``, or a :class:`ConfigError` on ``field`` listing the registered names."""
        if name in self:
            return self[name]
        raise self.unknown(name, field)

    def unknown(self, name: Any, field: str | None = None) -> ConfigError:
        """The error for an unknown ``name`` (listing the registered ones)."""
        return ConfigError(field or self.field or self.what, name, f"unknown {self.what}; choose one of {self.names()}")


def _describe(entry: Any) -> str:
    mod, qual = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
    return f"{mod}.{qual}" if mod and qual else type(entry).__name__
