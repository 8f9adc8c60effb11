"""One way to register anything: a named table filled from an entry-point group.

edgeslim finds its tasks, data providers, calibrators, quantize methods, stage configs and device
classes the same way, and the built-in ones are registered exactly as yours would be: an entry point
in the ``[project.entry-points."<group>"]`` table of a ``pyproject.toml``. Adding one from your own
package needs no edit inside edgeslim::

    [project.entry-points."edgeslim.calibrators"]
    p99 = "mypkg.calib:p99"            # name = "module:attribute"

A name that is not registered is refused in one line that lists what is, with a "did you mean".
``register`` adds an entry for this process only (a notebook, a test); an installed entry point with
the same name and a different target is a conflict, refused the same way.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from edgeslim.components.common.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """The entries of one entry-point group, loaded on first use.

    Args:
        group: the entry-point group, e.g. ``edgeslim.tasks``.
        what: how an error names an entry, e.g. ``task kind``.
        where: the recipe key an error names, e.g. ``task.kind`` ("" for none).
        error: the exception an unknown name raises (a ``ConfigError`` by default).
    """

    def __init__(self, group: str, what: str, *, where: str = "", error: Callable[[str], Exception] = ConfigError):
        self.group, self.what, self.where, self._error = group, what, where, error
        self._targets: dict[str, str] | None = None
        self._loaded: dict[str, T] = {}
        self._local: dict[str, T] = {}
        self._lock = threading.Lock()

    def _installed(self) -> dict[str, str]:
        if self._targets is None:
            found: dict[str, str] = {}
            for ep in entry_points(group=self.group):
                found.setdefault(ep.name, ep.value)
            self._targets = found
        return self._targets

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(set(self._installed()) | set(self._local))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._local or name in self._installed())

    def find(self, name: str) -> T | None:
        """The entry registered as ``name``, or None."""
        if name in self._local:
            return self._local[name]
        if name in self._loaded:
            return self._loaded[name]
        target = self._installed().get(name)
        if target is None:
            return None
        with self._lock:
            if name not in self._loaded:
                module, _, attr = target.partition(":")
                obj: Any = importlib.import_module(module)
                for part in attr.split(".") if attr else ():
                    obj = getattr(obj, part)
                self._loaded[name] = obj
        return self._loaded[name]

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ConfigError (or the registry's own error): no such name; the message lists the known ones.
        """
        found = self.find(name) if isinstance(name, str) else None
        if found is None:
            raise self._error(self.unknown(name))
        return found

    def unknown(self, name: Any) -> str:
        """The one line that refuses ``name``: what is known, and the closest name."""
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"{self.where}: " if self.where else ""
        return (f"{where}unknown {self.what} {name!r}; {hint}known: {', '.join(known) or 'none'} "
                f"(add one with an entry point in the group {self.group!r})")

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` as ``name`` for this process (an installed entry point is the lasting way)."""
        current = self._local.get(name)
        if current is None and name in self._installed():
            current = self.find(name)
        if current is not None and current is not obj and current != obj:
            raise self._error(f"{self.what} {name!r} is already registered; pick a new name")
        self._local[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Drop an entry :meth:`register` added (installed entry points stay)."""
        self._local.pop(name, None)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) for every registered name, loading each."""
        return [(n, self.get(n)) for n in self.names()]
