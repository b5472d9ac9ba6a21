"""How ``convert`` and ``export`` write a checkpoint folder: whole or not at all.

The checkpoint is written into a hidden staging folder beside OUT_DIR (same file system) and renamed
to OUT_DIR at the end (`write_checkpoint`); a run that fails takes back what it wrote, the folders it
made above OUT_DIR included. OUT_DIR itself is checked before any work (`checked_out_dir`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import uuid

from .report import CLIError, first_line


__all__ = ["Terminated", "checked_out_dir", "sigterm_unwinds", "write_checkpoint"]

# The installed package: no command writes into it.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
# A staging folder's name: "." + OUT_DIR's name (cut to fit) + the mark + "PID-RANDOM".
_STAGING_MARK = ".converting-"
_STAGING_NAME = re.compile(r"(?P<pid>[0-9]+)-[0-9a-f]{8}")
_STAGING_SUFFIX_BYTES = 20 + 1 + 8  # the longest pid (64 bits), "-", the random part
_NAME_BYTES = 255  # what a file name may take on Linux, macOS and Windows file systems


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``kill``, ``timeout``, ``docker stop``) while a checkpoint is written: unwinds as Ctrl-C
    does, so that what was written is taken back (a `KeyboardInterrupt`, which no ``except Exception``
    swallows on the way)."""


@contextlib.contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM raises `Terminated` (in the main thread, the only one signals reach)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(f"stopped by signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_checkpoint(load, save, destination: str, out_dir: str) -> None:
    """Write a checkpoint into a hidden sibling of OUT_DIR and rename it to OUT_DIR at the end: a run
    that fails (a full disk, a bad checkpoint, Ctrl-C, SIGTERM) leaves OUT_DIR as it found it, and
    nothing beside it; a staging folder a killed run left (SIGKILL) is removed by the next one.
    ``load()`` makes what ``save(loaded, folder)`` writes, once the place is known to be writable."""
    with sigterm_unwinds():
        _write_checkpoint(load, save, destination, out_dir)


def _write_checkpoint(load, save, destination: str, out_dir: str) -> None:
    created = _make_parents(destination, out_dir)
    staging = None
    try:
        _remove_stale_staging(destination)
        staging = _staging_folder(destination, out_dir)  # can it be written? asked before the work
        loaded = load()
        try:
            save(loaded, staging)
        except Exception as error:  # a full disk: OSError, or the Rust writers' own errors
            raise CLIError(f"{out_dir}: cannot write the checkpoint ({first_line(error)}); nothing was kept") from None
        _move_into_place(staging, destination, out_dir)
        staging = created = None
    finally:  # a failed run (Ctrl-C included) takes back what it wrote
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created or ()):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def checked_out_dir(out_dir: str) -> str:
    """The folder the checkpoint will be renamed to: OUT_DIR, or the folder a link there points to.
    OUT_DIR must be missing or an empty folder; nothing is ever written through a broken link."""
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise CLIError(f"{out_dir}: a symbolic link to {os.readlink(out_dir)}, which does not exist")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"{out_dir}: an existing file, not a folder (nothing is overwritten)")
    destination = os.path.realpath(out_dir)
    if os.path.commonpath([destination, _PACKAGE_DIR]) == _PACKAGE_DIR:
        raise CLIError(
            f"{out_dir}: inside the installed zip2zip_hf package ({_PACKAGE_DIR}); nothing is written there"
        )
    if os.path.isdir(destination):
        try:
            entries = os.listdir(destination)
        except OSError as error:
            raise CLIError(f"{out_dir}: cannot read it ({error.strerror or error})") from None
        if entries:
            raise CLIError(f"{out_dir}: not empty (nothing is overwritten)")
    return destination


def _make_parents(destination: str, out_dir: str) -> list[str]:
    """Create the folders above ``destination`` that are missing (as save_pretrained would); return
    them, outermost first, so that a failed run can remove them again."""
    missing, folder = [], os.path.dirname(destination)
    while folder and not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise CLIError(f"{out_dir}: {folder} is a file, not a folder")
        missing.append(folder)
        folder = os.path.dirname(folder)
    created: list[str] = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except OSError as error:
            for made in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(made)
            raise CLIError(f"{out_dir}: cannot create {folder} ({error.strerror or error})") from None
        created.append(folder)
    return created


def _staging_prefix(destination: str) -> str:
    """The start of the name of every staging folder for ``destination``: its own name, cut so that the
    staging name stays within the 255 bytes a file name may take where OUT_DIR's own name did."""
    name = os.path.basename(destination)
    keep = _NAME_BYTES - len(".") - len(_STAGING_MARK) - _STAGING_SUFFIX_BYTES
    return f".{os.fsencode(name)[:keep].decode(errors='ignore')}{_STAGING_MARK}"


def _remove_stale_staging(destination: str) -> None:
    """Remove the staging folders for ``destination`` that runs killed outright (SIGKILL, a power cut)
    left: those whose process no longer runs on this machine. Each is named on stderr."""
    parent, prefix = os.path.dirname(destination), _staging_prefix(destination)
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            match = _STAGING_NAME.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
            if match is None or not entry.is_dir(follow_symlinks=False) or _process_runs(int(match["pid"])):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            print(
                f"removed {entry.path}: a checkpoint a run (process {match['pid']}, no longer running) "
                "left half-written",
                file=sys.stderr,
            )


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it runs
        return True
    return True


def _staging_folder(destination: str, out_dir: str) -> str:
    """A new hidden folder beside ``destination`` (same file system: the final rename is atomic)."""
    parent = os.path.dirname(destination)
    staging = os.path.join(parent, f"{_staging_prefix(destination)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(staging)
    except OSError as error:  # a read-only disk, no permission
        raise CLIError(f"{out_dir}: cannot write in {parent} ({error.strerror or error})") from None
    return staging


def _move_into_place(staging: str, destination: str, out_dir: str) -> None:
    """Rename the finished checkpoint to its place: atomically, over an empty folder too."""
    try:
        os.replace(staging, destination)  # POSIX replaces an empty folder
        return
    except OSError as error:
        failure = error
    if os.path.isdir(destination) and not os.listdir(destination):  # where rename does not replace a folder
        with contextlib.suppress(OSError):
            os.rmdir(destination)
            os.rename(staging, destination)
            return
    if os.path.isdir(destination) and os.listdir(destination):
        raise CLIError(f"{out_dir}: not empty any more (something else wrote there meanwhile; nothing is overwritten)")
    raise CLIError(f"{out_dir}: cannot put the checkpoint there ({failure.strerror or failure})")
