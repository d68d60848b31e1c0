"""Replacing files all or nothing: the one atomic-write routine every writer of lora-fx uses.

:func:`replace_files` moves already-written files onto their targets with ``os.replace``, in the
order given, after hard-linking (or copying) a backup of every target that exists. If a move fails
(or the process is interrupted), the moves already made are undone: targets that existed get their
backup back, new ones are removed. So a reader sees either all old files or all new ones, except
between two renames, and a failure never leaves a mix (an old ONNX model beside new external data
would load silently with the wrong weights). No backup or temp file outlives the call.

Used by :func:`write_files_atomically` (adapter folders), :func:`write_file_atomically` (single
files such as ONNX Runtime adapters) and :func:`lora_fx.exporters.files.install` (a model and
its ``.data`` file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_files", "write_file_atomically", "write_files_atomically"]


def replace_files(moves: list[tuple[str, str]], backup_dir: str | os.PathLike) -> None:
    """``os.replace(src, dst)`` for each pair, in order; undone entirely if any of them fails.

    Args:
        moves: (written file, target) pairs; each source on the target's file system.
        backup_dir: where the backups of existing targets are hard-linked (same file system).
    """
    backups: dict[str, str] = {}
    done: list[str] = []
    try:
        for _, dst in moves:
            if os.path.exists(dst):
                fd, bak = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".bak", dir=backup_dir)
                os.close(fd)
                os.unlink(bak)
                try:
                    os.link(dst, bak)
                except OSError:
                    shutil.copy2(dst, bak)
                backups[dst] = bak
        for src, dst in moves:
            os.replace(src, dst)
            done.append(dst)
    except BaseException:
        for dst in reversed(done):
            if dst in backups:
                os.replace(backups.pop(dst), dst)
            else:
                os.unlink(dst)
        raise
    finally:
        for bak in backups.values():
            if os.path.exists(bak):
                os.unlink(bak)


def write_files_atomically(folder: Path, files: list[tuple[str, bytes]]) -> None:
    """Writes every file to a temp file in ``folder`` (fsync-ed), then replaces them all or nothing."""
    temps: list[tuple[str, str]] = []
    try:
        for name, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            temps.append((tmp, str(Path(folder) / name)))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        replace_files(temps, folder)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_file_atomically(path: str | os.PathLike, produce: Callable[[str], None]) -> None:
    """``produce(tmp)`` writes a temp file beside ``path``, which then replaces ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        produce(tmp)
        replace_files([(tmp, path)], folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
