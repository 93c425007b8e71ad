"""One registry mechanism for every extension point: name → definition, with one lookup error.

OoD scores, temporal heads and benchmark protocols (retrieval and OoD) are each a :class:`Registry`;
adding one is one ``register`` call beside its definition (ARCHITECTURE.md, extension points).
Registering the same name twice is refused unless the definition is equal (re-importing a user
module that registers its protocols is harmless).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

from mmsphere.errors import ConfigError

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """Named definitions of one kind (``kind`` names it in errors), in registration order; a mapping.

    ``registry[name] = definition`` replaces an entry (a test swapping a definition, ``monkeypatch.setitem``)
    after the same type check as :meth:`register`; ``del registry[name]`` removes one.
    """

    def __init__(self, kind: str, definition_type: type | tuple[type, ...], *, listing_hint: str = "",
                 unknown: str = "unknown {kind} {name!r}; known: {known}") -> None:
        self.kind = kind
        self.definition_type = definition_type
        self.listing_hint = listing_hint  # where a user sees them all, e.g. "mmsphere protocols lists them"
        self.unknown = unknown  # the lookup error's sentence: {kind}, {name} and {known} are filled in
        self._entries: dict[str, T] = {}

    def register(self, name: str, definition: T) -> T:
        """Add ``definition`` under ``name``; a different definition under a taken name is refused."""
        self._check_entry(name, definition)
        if name in self._entries and self._entries[name] != definition:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = definition
        return definition

    def unregister(self, name: str) -> None:
        """Remove ``name`` if registered (tests that register a definition of their own clean up with this)."""
        self._entries.pop(name, None)

    def lookup(self, name: str) -> T:
        """The definition registered as ``name``; an unknown name raises ``ConfigError`` listing the known ones."""
        if name not in self._entries:
            hint = f" ({self.listing_hint})" if self.listing_hint else ""
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ConfigError(self.unknown.format(kind=self.kind, name=name, known=known) + hint)
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def check(self, name: str, where: str) -> str | None:
        """A problem sentence when ``name`` (the value of setting ``where``) is not registered, else None."""
        if name in self._entries:
            return None
        return f"{where}={name!r} must be one of {', '.join(self.names())}"

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, definition: T) -> None:
        self._check_entry(name, definition)
        self._entries[name] = definition

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    def _check_entry(self, name: str, definition: T) -> None:
        if not isinstance(definition, self.definition_type):
            expected = getattr(self.definition_type, "__name__", str(self.definition_type))
            raise TypeError(f"a {self.kind} must be a {expected}, got {type(definition).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")


def registering(registry: Registry[T], name: str) -> Callable[[T], T]:
    """Decorator form of :meth:`Registry.register`: ``@registering(TEMPORAL_HEADS, "mean")``."""
    def decorate(definition: T) -> T:
        return registry.register(name, definition)
    return decorate
