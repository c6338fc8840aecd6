"""One process at a time per output folder: ``evaluate`` and ``attack`` hold a lock file in
``--out`` while they work, so a second one on the same folder is refused at once instead of
redoing every image and appending a second copy of each manifest line.

The lock is ``OUT/.erasekit.lock``, holding the owner's pid, host and start time (for the
message), locked with ``flock``: the kernel releases it when the owner dies, however it dies, so
the lock file of a dead process is simply taken over. The owner deletes the file when it
finishes, on an error too. Within one process the lock is re-entrant (the command line takes it
before loading the model, ``evaluate`` again inside).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".erasekit.lock"
_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process


class OutputInUse(UserError, RuntimeError):
    """Another live process is writing to the same output folder (or the folder is a file)."""


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
        return f"pid {info['pid']}{where}, {info.get('command', 'erasekit')}, since {info.get('started', '?')}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "another process"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None if another process holds it."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the owner deleted the file after we opened it: lock the new one


@contextmanager
def output_lock(folder: str | Path, command: str = "erasekit") -> Iterator[Path]:
    """Hold the lock of output folder ``folder`` (made if missing) for the ``with`` body.

    Raises :class:`OutputInUse` (one line: who holds it) when another live process holds it.
    On leaving, the lock file is deleted, and ``folder`` too if this call made it and it is
    still empty. ``command`` is recorded for the other process's message.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputInUse(f"output folder {folder} exists and is not a folder; name a folder instead")
    path = (folder / LOCK_FILE).resolve() if folder.exists() else None
    if path is not None and path in _held:
        _held[path] += 1
        try:
            yield folder
        finally:
            _held[path] -= 1
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    fd = None
    try:
        fd = _try_lock(path)
        if fd is None:
            raise OutputInUse(
                f"{folder} is in use by another erasekit process ({_owner(path)}); "
                "wait for it to finish or use another --out"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "time": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[path] = 1
        try:
            yield folder
        finally:
            del _held[path]
            path.unlink(missing_ok=True)  # before the lock goes: nobody can lock a file that is deleted
    finally:
        if fd is not None:
            os.close(fd)
        if made:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                pass
