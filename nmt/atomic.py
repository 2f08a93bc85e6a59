"""Writing a file or a whole directory atomically: built under a temporary name beside the
target, then renamed over it.

A crash, an interrupt or a full disk never leaves a half-written file in place of a good one:
either the new version is complete and in place, or the previous one is untouched and the
temporary is gone. The new version's data is handed to the disk (fsync) before the rename, and
the rename itself after it (an fsync of the directory that holds it), so a power cut too finds one
version or the other, and once a write has returned, the new one (as far as fsync reaches: on
macOS the drive's own cache may still hold it). Every writer in nmt goes through here: the model directory (config,
weights, tokenizer, training summary), checkpoints, the token cache, data fingerprints and
the CTranslate2 export. What to write is the caller's business (a callback gets the
temporary path); this module knows nothing of models or formats.

An existing file's permission bits are kept. A symlink is replaced by the file unless the caller
asks to write through it (`follow_link`: a command's `-o FILE`, as a shell's `>` does): a run's own
files never change a file elsewhere that a link of theirs points to.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nmt.errors import NmtError


def write_error(path: Path, e: OSError) -> NmtError:
    """The one-line error for a failed write (a full disk says so)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NmtError(f"{path}: cannot write: disk full while writing (the previous version is kept)")
    return NmtError(f"{path}: cannot write ({e.strerror or e})")


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sync(path: Path) -> None:
    """fsync a file, or a directory (its entries: a rename in it); a filesystem or system that
    cannot sync a directory (EINVAL, EBADF, EACCES, ENOTSUP; Windows) is let be. A file is opened
    for writing where it can be (Windows flushes only such a handle), else for reading (POSIX)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except OSError as e:
        if path.is_dir():
            return  # a directory that cannot be opened to sync (Windows)
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not path.is_dir() or e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], None], staged: bool = False, parents: bool = True,
               follow_link: bool = False) -> None:
    """Call write(tmp_path), fsync, then rename over `path` and fsync its directory; on failure
    remove the temporary. `staged`: `path` is in a `directory()` being built, which syncs all its
    files and folders itself before its own rename (both syncs are left to it). `parents`: make
    the missing folders above `path` (else a missing one is the write's error). `follow_link`: a
    symlink at `path` is written through (`written_path`). The file replaced keeps its permission bits."""
    path = Path(path)
    target = written_path(path) if follow_link else path
    tmp = temporary_name(target)
    try:
        if parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _keep_mode(target, tmp)
        if not staged:
            sync(tmp)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not staged:
        sync_renamed(target)


def written_path(path: Path) -> Path:
    """The file a write of `path` replaces: `path`, or where a symlink at `path` leads (followed to
    the end, a dangling link's missing target included), so that the link stays a link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _keep_mode(target: Path, tmp: Path) -> None:
    """Give the new version the permission bits of the file it replaces (a new file: the umask's)."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


def sync_renamed(path: Path) -> None:
    """fsync the directory holding `path`, just renamed into place; a failure is an error that says
    the new version is written (in place, perhaps not yet on the disk), not that the old one is kept."""
    try:
        sync(path.parent)
    except OSError as e:
        raise NmtError(f"{path}: written, but its folder could not be synced to the disk ({e.strerror or e})") from None


def write_text(path: Path, text: str, staged: bool = False) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), staged)


@contextmanager
def directory(path: Path, error: Callable[[OSError], NmtError] | None = None) -> Iterator[Path]:
    """`with directory(path) as tmp:` fill `tmp`; when the block ends normally its files and
    folders are synced to disk and it replaces `path` (a previous version is moved aside first
    and restored if the rename fails; the rename is synced too), and on any error it is removed
    and `path` is left as it was. An OSError becomes `error(e)` (default: `write_error`)."""
    path = Path(path)
    tmp = temporary_name(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                sync(Path(folder, name))
            sync(Path(folder))
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError):
            raise (error(e) if error else write_error(path, e)) from None
        raise
    try:
        sync_renamed(path)
    finally:  # the old version goes once the new one's rename is on the disk
        shutil.rmtree(old, ignore_errors=True)
