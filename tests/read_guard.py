"""What the suite may read: a test's verdict must not depend on what else a machine has.

A fresh machine has the repository, the virtualenv `make setup` builds and the interpreter it was
built from; a developer's machine has more (Debian's ``rust-src``, a Hugging Face cache, packages
installed by hand). A test that reads any of that can pass on one and fail on the other, so CI
being green would prove nothing. `ReadGuard` is a Python audit hook (PEP 578) that records every
file the test process opens and every folder it lists outside `allowed_places`; ``conftest.py``
fails the test that did it, naming the path (or the session, for a read outside any test).

It sees this process only: a test's subprocesses inherit the same environment (``conftest.py``
points every cache into the repository or the temporary folder) but are not watched.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[1]

# Places every machine has, read by the interpreter and the libraries the suite imports: the
# kernel's views of the machine (CPU count, memory), the system's configuration (locale,
# certificates, user names) and its time-zone database.
SYSTEM_PLACES = ("/dev", "/proc", "/sys", "/etc", "/usr/share/zoneinfo")

# The audit events that read a path (open's first argument may also be a file descriptor).
READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob"})


def allowed_places() -> tuple[str, ...]:
    """The repository (its virtualenvs too), the running virtualenv, the interpreter's own install
    (the standard library), the temporary folder and `SYSTEM_PLACES`, each as a resolved path."""
    places = {
        REPOSITORY,
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        sysconfig.get_paths()["stdlib"],
        tempfile.gettempdir(),
        *SYSTEM_PLACES,
    }
    return tuple(sorted({os.path.realpath(place) for place in places}))


class ReadGuard:
    """Records ``(event, path)`` for each read outside ``places``; `take` hands over what is new."""

    def __init__(self, places: tuple[str, ...]):
        self.places = places
        self._reads: list[tuple[str, str]] = []
        self._inside = threading.local()

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def allows(self, path: str) -> bool:
        """Whether ``path`` is in ``places`` once resolved (a link inside them that leads elsewhere
        does not pass), or is a path of the system's own (`SYSTEM_PLACES`: ``/etc/os-release``
        links into ``/usr/lib``), wherever it leads."""
        return _within(os.path.realpath(path), self.places) or _within(os.path.abspath(path), SYSTEM_PLACES)

    def _hook(self, event: str, args: tuple) -> None:
        if event not in READ_EVENTS or getattr(self._inside, "active", False):
            return
        path = args[0] if args else None
        if path is None and event in ("os.listdir", "os.scandir"):
            path = "."
        if isinstance(path, int) or path is None:
            return
        self._inside.active = True  # realpath below must not come back here
        try:
            path = os.fsdecode(path)
            if not self.allows(path):
                self._reads.append((event, os.path.abspath(path)))
        finally:
            self._inside.active = False

    def take(self) -> list[tuple[str, str]]:
        """The reads outside the allowed places since the last call (each path once)."""
        reads, self._reads = self._reads, []
        return list(dict.fromkeys(reads))


def _within(path: str, places) -> bool:
    return any(path == place or path.startswith(place + os.sep) for place in places)


def describe(reads: list[tuple[str, str]], limit: int = 10) -> str:
    shown = [f"  {event} {path}" for event, path in reads[:limit]]
    more = [f"  ... and {len(reads) - limit} more"] if len(reads) > limit else []
    return "\n".join(
        ["read outside the repository, its virtualenv, the interpreter and the temporary folder:", *shown, *more]
    )
