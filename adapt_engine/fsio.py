"""Crash-safe file output: the one atomic writer of the package, atomic folders, and output pre-flight checks.

Rules every writer here keeps:

* a file or folder is written under a temporary name beside its target, flushed to disk (fsync of the
  data and of the parent folder), then renamed into place, so a ``kill -9`` at any instant leaves either
  the old content or the new, never a mix and never nothing;
* replacing an existing folder swaps the two atomically (Linux ``renameat2(RENAME_EXCHANGE)``); where the
  kernel lacks it, the old folder is moved aside first and :func:`recover_interrupted` puts it back after
  a crash between the two renames;
* temporary names carry the writer's pid (``.NAME.tmp-<pid>-<random>``), so a later run removes only
  leftovers whose owner is dead;
* new files and folders get the permissions the umask allows (``mkstemp``/``mkdtemp`` would give 0600/0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import OutputPathError

OUTPUT_MARKER = ".adapt-engine-output"
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def current_umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems refuse fsync on folders; the data files were synced
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (before it is renamed into place)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def _temp_name(target: Path, tag: str) -> str:
    return f".{target.name}{tag}{os.getpid()}-"


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, text, or a function that writes a given temporary path) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(path)  # temporaries of a writer killed earlier
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_name(path, _TMP_TAG), dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fd = -1
                fh.write(data.encode() if isinstance(data, str) else data)
        _chmod_default(tmp, is_dir=False)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj, **dumps_kwargs) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``dumps_kwargs`` go to ``json.dumps``; indent 2 by default)."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write(path, json.dumps(obj, **dumps_kwargs) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the kernel or libc cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish_dir(tmp: Path, target: Path, *, overwrite: bool) -> Path:
    """Move the finished folder ``tmp`` to ``target``; with ``overwrite`` an existing folder is replaced atomically."""
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputPathError(f"'{target}' exists and is not a folder; choose another output path")
        if not overwrite and any(target.iterdir()):
            raise OutputPathError(f"'{target}' exists and is not empty; pass --overwrite or another path")
        if _exchange(tmp, target):
            fsync_path(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old content
            return target
        old = Path(tempfile.mkdtemp(prefix=_temp_name(target, _OLD_TAG), dir=target.parent))
        os.rename(target, old / "content")
        os.rename(tmp, target)  # a crash before this line is repaired by recover_interrupted()
        fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return target
    os.rename(tmp, target)
    fsync_path(target.parent)
    return target


def _pid_of(name: str, tag: str) -> int | None:
    try:
        return int(name.split(tag, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None) -> bool:
    """Whether a process with this id runs on this machine (None: no; our own id: yes)."""
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(target: str | Path) -> None:
    """Repair what a killed writer of ``target`` left: restore a folder moved aside, remove dead temporaries."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for tag in (_OLD_TAG, _TMP_TAG):
        for leftover in parent.glob(f".{glob_escape(target.name)}{tag}*"):
            if process_alive(_pid_of(leftover.name, tag)):
                continue
            content = leftover / "content"
            if tag == _OLD_TAG and content.is_dir() and not target.exists():
                os.rename(content, target)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False, marker: str | None = "output") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target`` atomically.

    ``marker`` names what wrote it (saved as ``OUTPUT_MARKER``), so that ``--overwrite`` can later refuse
    to replace folders adapt-engine did not write. On any exception the temporary folder is removed and
    ``target`` is untouched.
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(target, _TMP_TAG), dir=target.parent))
    try:
        _chmod_default(tmp, is_dir=True)
        yield tmp
        if marker is not None:
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "adapt-engine", "kind": marker}) + "\n")
        fsync_tree(tmp)
        publish_dir(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def written_by_us(folder: Path) -> bool:
    """True for a folder adapt-engine wrote: it has the output marker, or it is a saved pruned model."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    cfg = folder / "config.json"
    try:
        return cfg.is_file() and "adapt_base_model_type" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents


def preflight_output(
    path: str | Path,
    *,
    overwrite: bool = False,
    protect: Iterable[str | Path | None] = (),
    need_bytes: int = 0,
    flag: str = "--output",
) -> Path:
    """Check before any work that ``path`` can be written and that writing it destroys nothing it must not.

    Refuses: a path that is a file or lies under a file; an unwritable or read-only location; a non-empty
    folder without ``overwrite``; with ``overwrite``, a folder adapt-engine did not write, or the current
    folder or one of its parents; a path equal to or containing any ``protect`` path (e.g. the input model);
    a disk with less than ``need_bytes`` free. Returns the absolute path.
    """
    raw = Path(path).expanduser()
    out = raw.absolute()
    resolved = out.resolve()
    recover_interrupted(out)
    for item in protect:
        if item is None:
            continue
        guarded = Path(item).expanduser().absolute().resolve()
        if _overlaps(resolved, guarded):
            raise OutputPathError(
                f"{flag} '{raw}' is or contains '{item}', an input of this command; writing there would destroy "
                f"it. Choose another {flag}"
            )
    if out.exists():
        if not out.is_dir():
            raise OutputPathError(f"{flag} '{raw}' is an existing file, not a folder; choose another {flag}")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputPathError(f"{flag} '{raw}' exists and is not empty; pass --overwrite or another path")
            if _overlaps(resolved, Path.cwd().resolve()) or resolved == Path.home().resolve():
                raise OutputPathError(
                    f"{flag} '{raw}' is the current folder, one of its parents or the home folder; --overwrite "
                    f"would delete it. Choose a new folder for {flag}"
                )
            if not written_by_us(out):
                raise OutputPathError(
                    f"{flag} '{raw}' holds files that adapt-engine did not write; --overwrite only replaces "
                    f"earlier adapt-engine outputs. Remove it yourself or choose another {flag}"
                )
    anchor = _nearest_existing(out.parent)
    if not anchor.is_dir():
        raise OutputPathError(f"{flag} '{raw}' cannot be created: '{anchor}' is a file; choose another {flag}")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".adapt-engine-probe-", dir=anchor))
        probe.rmdir()
    except OSError as err:
        raise OutputPathError(
            f"{flag} '{raw}' cannot be written: creating a folder in '{anchor}' failed ({err.strerror}); "
            f"choose a writable location"
        ) from err
    if need_bytes > 0:
        free = shutil.disk_usage(anchor).free
        if free < need_bytes:
            raise OutputPathError(
                f"{flag} '{raw}': the disk holding '{anchor}' has {free / 2**30:.2f} GiB free, the output needs "
                f"about {need_bytes / 2**30:.2f} GiB; free space or choose another {flag}"
            )
    return out
