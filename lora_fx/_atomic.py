"""Writing several files into one folder so that a failure leaves the folder as it was."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_files_atomically(folder: Path, files: list[tuple[str, bytes]]) -> None:
    """Writes every file to a temp file in ``folder``, then os.replace-s them in order.

    If a later replace fails, the files already replaced are restored from hard-link (or copy)
    backups, so the folder keeps the previous adapter; no temp file is left behind either way.
    """
    temps: list[tuple[str, str]] = []
    backups: list[tuple[str, str]] = []
    done: list[str] = []
    try:
        for name, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            temps.append((name, tmp))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for name, _ in files:
            target = folder / name
            if target.exists():
                fd, bak = tempfile.mkstemp(prefix=f".{name}.", suffix=".bak", dir=folder)
                os.close(fd)
                os.unlink(bak)
                try:
                    os.link(target, bak)
                except OSError:
                    shutil.copy2(target, bak)
                backups.append((name, bak))
        for name, tmp in temps:
            os.replace(tmp, folder / name)
            done.append(name)
    except BaseException:
        restore = dict(backups)
        for name in done:
            if name in restore:
                os.replace(restore.pop(name), folder / name)
            else:
                os.unlink(folder / name)
        raise
    finally:
        for _, tmp in temps + backups:
            if os.path.exists(tmp):
                os.unlink(tmp)
