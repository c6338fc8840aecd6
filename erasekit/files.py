"""Writing result folders so that a failure never leaves a half-written one behind, and so that
nothing the user put in a folder is ever deleted to make room for a result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, folder: bool) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode an ordinary write would (0644/0755)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _readable_tree(folder: Path) -> None:
    """Add the read (and, for folders, search) bits the umask allows to everything under ``folder``."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        extra = (0o555 if path.is_dir() else 0o444) & ~mask
        os.chmod(path, path.stat().st_mode | extra)


class OutputRefused(UserError, FileExistsError):
    """The output path holds something erasekit may not replace; the message says what to do."""


def check_output_folder(
    target: str | Path,
    *,
    replaceable: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    what: str = "output folder",
    hint: str = "",
) -> None:
    """Refuse ``target`` as a folder to (re)write unless it is missing, an empty folder, or a
    folder that ``replaceable`` recognises as an earlier result of the same kind and
    ``overwrite`` is set. Call it before long work starts; :func:`atomic_folder` checks again.

    Raises :class:`OutputRefused` with a one-line message naming the path and the fix.
    """
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputRefused(f"{what} {target} is the current folder or holds it; name a new folder instead")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputRefused(f"{what} {target} exists and is not a folder; name a new folder instead")
    if not target.exists() or not any(target.iterdir()):
        return
    if replaceable is not None and replaceable(target):
        if overwrite:
            return
        raise OutputRefused(f"{what} {target} already exists; pass --overwrite to replace it{hint}")
    raise OutputRefused(
        f"{what} {target} is not empty and was not written by erasekit; nothing was changed: name a new folder"
    )


@contextmanager
def atomic_folder(
    target: str | Path, *, replaceable: Callable[[Path], bool] | None = None, overwrite: bool = True
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it takes ``target``'s place
    (renamed into place), on an exception it is deleted and ``target`` is left as it was.

    An existing ``target`` is replaced only if it is an empty folder, or ``replaceable(target)``
    says it is an earlier result of the same kind and ``overwrite`` is set; anything else raises
    :class:`OutputRefused` (checked before the body runs and again before the swap). The old
    folder is renamed aside first and deleted only once the new one is in place.
    """
    target = Path(target)
    check_output_folder(target, replaceable=replaceable, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    old: Path | None = None
    try:
        yield tmp
        _normal_mode(tmp, folder=True)
        _readable_tree(tmp)
        check_output_folder(target, replaceable=replaceable, overwrite=overwrite)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
            old.rmdir()
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)
                old = None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists():
            shutil.rmtree(old)


def atomic_write_file(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Have ``write(path)`` write a temporary file in ``target``'s folder (a writer that wants a
    path, e.g. ``safetensors.torch.save_file``, so that a large file is never held in memory),
    then rename it into place: readers see the old file or the whole new one, never a part; if
    ``write`` raises, the temporary file is deleted and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _normal_mode(Path(tmp), folder=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` through a temporary file in the same folder renamed into
    place: readers see the old file or the whole new one, never a part."""
    return atomic_write_file(target, lambda path: path.write_bytes(data))


def atomic_write_text(target: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(target, text.encode("utf-8"))
