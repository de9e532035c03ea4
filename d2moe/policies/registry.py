"""A registry per plug-in family: adding a policy is one class and one `register` line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from d2moe.core.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory for one family (schedulers, residency, bit rules, substitution modes,
    prefetchers, presets)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}
        self._needs_stats: dict[str, bool] = {}

    def register(self, name: str, doc: str = "", *, needs_stats: bool = False
                 ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator registering a factory as `name` (its docstring's first line when `doc`
        is empty); a name registered twice is a ValueError. `needs_stats`: the factory
        cannot build without offline expert statistics (its `stats` argument; a policy using
        it asks for them: `PolicyConfig.needs_stats`)."""
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._items[name] = factory
            self._docs[name] = doc or next(iter((factory.__doc__ or "").strip().splitlines()),
                                           "")
            self._needs_stats[name] = needs_stats
            return factory
        return deco

    def factory(self, name: str, *, field: str = "") -> Callable[..., T]:
        """The factory registered as `name` (UserError naming the choices if unknown, and
        `field`, the option the name came from: default the family)."""
        if name not in self._items:
            raise UserError(f"unknown {self.family} {name!r}", field=field or self.family,
                            fix=f"choose one of: {', '.join(self.names())}")
        return self._items[name]

    def create(self, name: str, **kwargs: object) -> T:
        """A fresh object from the factory registered as `name`."""
        return self.factory(name)(**kwargs)

    def needs_stats(self, name: str, *, field: str = "") -> bool:
        """Whether `name` was registered as needing expert statistics (a UserError naming
        `field` if unknown, as `factory`)."""
        self.factory(name, field=field)
        return self._needs_stats[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def doc(self, name: str) -> str:
        """The one-line description of `name`."""
        return self._docs[name]

    def describe(self) -> str:
        """Every name with its one-line description, for help texts."""
        return "; ".join(f"{n}: {self._docs[n]}" for n in self.names())
