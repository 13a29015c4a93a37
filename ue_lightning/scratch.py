"""Temporary files and folders next to an output, named by their owner, and the clean-up of a killed run's.

Outputs are written to a temporary sibling and renamed into place, so a killed run never
leaves a half-written result under the real name. It may leave the temporary sibling,
though: each one is named ``.<output name>.<host>.<pid>.<random><suffix>``, and the next run
for the same output removes those whose process, on this host, no longer exists. A
sibling of another host (a multi-node run on a shared filesystem) or of a live process
(a concurrent run) is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def _prefix(output: Path) -> str:
    return f".{output.name}.{socket.gethostname()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale(output: Path) -> list[Path]:
    """Remove the temporary siblings of ``output`` left by dead processes of this host; return them."""
    output = Path(output)
    removed = []
    if not output.parent.is_dir():
        return removed
    prefix = _prefix(output)
    for path in output.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def scratch_file(output: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new temporary file next to ``output`` (after removing stale ones): ``(fd, path)``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    fd, path = tempfile.mkstemp(prefix=f"{_prefix(output)}{os.getpid()}.", suffix=suffix, dir=output.parent)
    return fd, Path(path)


def scratch_dir(output: Path, suffix: str = "") -> Path:
    """A new temporary folder next to ``output`` (after removing stale ones)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    return Path(tempfile.mkdtemp(prefix=f"{_prefix(output)}{os.getpid()}.", suffix=suffix, dir=output.parent))


def as_published(path: Path) -> None:
    """Give the scratch file or folder ``path`` the permissions of a plain ``open`` or ``mkdir`` before it is renamed
    into place: 0666 (a folder 0777) less the user's umask, not mkstemp's 0600 or mkdtemp's 0700, so what is meant
    to be shared (noise files, exports, checkpoints, results) is as readable as the user's other files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def atomic_write_bytes(output: Path, data: bytes) -> None:
    """Write ``data`` to ``output`` through a temporary sibling (fsync, rename): ``output`` holds the old content
    or the new one, never a part. The file gets the usual permissions (:func:`as_published`)."""
    output = Path(output)
    fd, tmp = scratch_file(output, output.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        as_published(tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(output: Path, data: Any) -> None:
    """``data`` as indented JSON at ``output``, atomically and with the user's umask (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(output, json.dumps(data, indent=2).encode())
