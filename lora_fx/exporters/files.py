"""ONNX files on disk: the one home of staging, atomic install, loading and external-data reads.

Every writer of an ``.onnx`` file (export_onnx, fold_and_export, export_multi_lora, refold_onnx) does::

    with staging(path) as staged:      # a temp folder beside path; staged = <tmp>/<name>.onnx
        ...write staged (+ staged.data)...
        install(staged, path)          # data first, then the model; rolled back on failure

so an existing file (and its ``.data``) survives any failure, and no temp file is left behind. A
process killed mid-write (SIGKILL, power loss) cannot clean up: its staging folder carries its PID
(``.<name>.<pid>.<random>.tmp``), and the next staging for the same target removes the folders whose
process is gone (:func:`remove_stale`); a live process's folder is left alone.
Readers use :func:`load` (clear errors for missing, unreadable or empty files, with the caller's
error type), :func:`check` (``onnx.checker``), and :class:`DataFiles` / :func:`stored_nbytes` /
:func:`tensor_array` for initializer bytes, inline or in external data, without loading the weights.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .._atomic import replace_files
from ..errors import ExportError, LoraFxError, short_message
from .format import op_name

__all__ = ["CHUNK", "ORT_ONNX_DOMAIN_OPS", "DataFiles", "ExportInfo", "External", "check", "check_target", "describe",
           "external", "file_bytes", "initializer_names", "inline_bytes", "install", "is_external", "load",
           "remove_stale", "staging", "stored_nbytes", "tensor_array", "write_model"]

CHUNK = 64 << 20  # external data is streamed 64 MiB at a time to bound memory
# Fused ops ONNX Runtime registers in the ONNX domain (onnx.checker does not know them; optimize="ort").
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


# -- writing --------------------------------------------------------------------------------------

def check_target(path: str) -> str:
    """Return the directory of ``path`` after checking that a file can be created there."""
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise ExportError(f"cannot write ONNX to {path!r}: it is a directory; pass a file path such as {os.path.join(path, 'model.onnx')!r}")
    if not os.path.isdir(directory):
        raise ExportError(f"cannot write {path!r}: directory {directory!r} does not exist; create it first (os.makedirs(..., exist_ok=True)) or choose another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path!r}: directory {directory!r} is not writable; fix its permissions or choose another directory")
    return directory


@contextmanager
def staging(path: str | os.PathLike) -> Iterator[str]:
    """A temp folder beside ``path`` (checked writable); yields ``<tmp>/<basename(path)>``.

    Inside it the files carry their final names, so a model's relative external-data reference
    needs no fix-up when :func:`install` moves it. The folder is removed on exit, whatever happens.
    """
    path = os.path.abspath(os.fspath(path))
    directory = check_target(path)
    name = os.path.basename(path)
    remove_stale(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ExportError(f"cannot create a temporary folder in {directory!r} to write {path!r}: {exc}") from exc
    try:
        yield os.path.join(tmp, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(path: str | os.PathLike) -> list[str]:
    """Removes the staging folders of ``path`` (``.<name>.<pid>.<random>.tmp`` beside it) whose process
    no longer runs: what an export killed mid-way left. Returns the folders removed."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry)
        folder = os.path.join(directory, entry)
        if match and os.path.isdir(folder) and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it may still be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def write_model(path: str | os.PathLike, produce: Callable[[str], None]) -> None:
    """``produce(staged)`` writes the model (and its ``.data``) under its final name in a staging
    folder; it is then installed on ``path``. Exceptions from ``produce`` (a full disk, a serializer
    refusing) become :class:`ExportError` naming ``path``; nothing at ``path`` changes."""
    path = os.path.abspath(os.fspath(path))
    with staging(path) as staged:
        try:
            produce(staged)
        except LoraFxError:
            raise
        except Exception as exc:  # OSError (disk full), serializer errors
            raise ExportError(f"writing {path!r} failed: {short_message(exc)}") from exc
        install(staged, path)


def install(staged: str, path: str) -> None:
    """Moves a written model (and its ``.data`` file, if any) from ``staged`` onto ``path``.

    Data first: a reader that opens the new model must find the new data beside it. If the model
    rename fails the old data is put back (else the old model would silently read the new weights),
    see :func:`lora_fx._atomic.replace_files`. A stale ``path.data`` is removed when the new model
    has none.
    """
    staged_data, data_path = staged + ".data", path + ".data"
    external = os.path.exists(staged_data)
    moves = ([(staged_data, data_path)] if external else []) + [(staged, path)]
    try:
        replace_files(moves, os.path.dirname(staged))
        if not external and os.path.isfile(data_path):
            os.remove(data_path)
    except OSError as exc:
        raise ExportError(f"writing {path!r} failed: {short_message(exc)}") from exc


@dataclass
class ExportInfo:
    """What an export wrote (a backend's :class:`~.backends.base.ExportResult`; :func:`describe` reads one
    from a file).

    Attributes:
        path: Absolute path of the ``.onnx`` file.
        nodes: Number of nodes in the main graph.
        op_counts: Node count per op type (``domain::op`` outside the default domain).
        initializers: Number of initializers in the main graph.
        initializer_bytes: Their size in bytes, as stored.
        external_data: Whether the weights live in ``<path>.data``.
        seconds: Wall time of export plus write.
        opset: Version of the default ONNX domain.
    """

    path: str
    nodes: int
    op_counts: dict[str, int]
    initializers: int
    initializer_bytes: int
    external_data: bool
    seconds: float
    opset: int
    optimization: Any = None  # lora_fx.exporters.backends.torch_onnx.optimize.OptimizeReport when optimized


def describe(path: str | os.PathLike, seconds: float = 0.0) -> ExportInfo:
    """The :class:`ExportInfo` of a written file (its graph read without the weights)."""

    path = os.path.abspath(os.fspath(path))
    proto, _ = load(path)
    graph = proto.graph
    ops = Counter(op_name(n.domain, n.op_type) for n in graph.node)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportInfo(path=path, nodes=len(graph.node), op_counts=dict(ops), initializers=len(graph.initializer),
                      initializer_bytes=sum(stored_nbytes(t) for t in graph.initializer),
                      external_data=any(is_external(t) for t in graph.initializer), seconds=seconds, opset=opset)


# -- reading --------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, error: type[LoraFxError] = ExportError, role: str = "") -> tuple[onnx.ModelProto, str]:
    """The ModelProto with external data left on disk, and the folder its data files live in.

    Raises:
        ``error``: the file is missing, unreadable, or not an ONNX model (protobuf parses an empty
            or foreign file as an empty ModelProto without complaint); the message names the file.
    """
    path = os.fspath(path)
    what = f"{role} ONNX file" if role else "ONNX file"
    if not os.path.isfile(path):
        raise error(f"cannot read {what} {path!r}: no such file (it does not exist)")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise error(f"cannot read {what} {path!r}: {type(exc).__name__}: {exc}") from exc
    if not proto.ir_version or not proto.HasField("graph"):
        raise error(f"cannot read {what} {path!r}: it is not an ONNX model (no IR version or graph); "
                    "pass a .onnx file")
    return proto, os.path.dirname(os.path.abspath(path))


def check(source: str | os.PathLike | onnx.ModelProto, *, error: type[LoraFxError], role: str = "") -> None:
    """Raises ``error`` naming the file unless ``onnx.checker`` accepts it (missing external data too)."""
    what = f"{role} ONNX file" if role else "ONNX file"
    if isinstance(source, onnx.ModelProto):
        name, target = f"{role} ModelProto", source
    else:
        name = target = os.fspath(source)
        if not os.path.isfile(target):
            raise error(f"{what} {target!r}: no such file (it does not exist)")
    try:
        onnx.checker.check_model(target)
    except Exception as exc:  # ValidationError, protobuf DecodeError, OSError on external data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if any(first.startswith(f"No Op registered for {op} ") for op in ORT_ONNX_DOMAIN_OPS):
            return  # an optimize="ort" file: ONNX Runtime registers this fused op in the ONNX domain
        raise error(f"{what} {name!r} is not a valid ONNX model ({type(exc).__name__}: {first}); "
                    "pass the .onnx files written by fold_and_export / torch.onnx.export") from exc


def initializer_names(path: str | os.PathLike) -> set[str]:
    return {t.name for t in load(path)[0].graph.initializer}


@dataclass(frozen=True)
class External:
    """Where an initializer's bytes live in external data."""

    location: str
    offset: int
    length: int | None  # None: to the end of the file


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external(t: TensorProto) -> External:
    info = {e.key: e.value for e in t.external_data}
    return External(info.get("location", ""), int(info.get("offset", 0)),
                    int(info["length"]) if "length" in info else None)


def file_bytes(path: str) -> int:
    """Bytes of an .onnx file and its external data file (0 for what does not exist yet)."""
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p))


def stored_nbytes(t: TensorProto) -> int:
    """Bytes a TensorProto's values take as stored, without loading external data."""
    if is_external(t) and external(t).length is not None:
        return external(t).length
    if t.raw_data:
        return len(t.raw_data)
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return itemsize * int(np.prod(t.dims, dtype=np.int64))


def tensor_array(t: TensorProto, folder: str | None, *, error: type[LoraFxError] = ExportError) -> np.ndarray:
    """One initializer's values; external data is read for this tensor only."""
    try:
        return numpy_helper.to_array(t, folder or "")
    except Exception as exc:
        raise error(f"cannot read initializer {t.name} from {folder}: {exc}") from exc


def inline_bytes(t: TensorProto) -> bytes:
    """The values of an inline initializer as bytes (typed fields decoded, so they equal raw_data)."""
    if t.HasField("raw_data"):
        return t.raw_data  # one copy out of protobuf; the bulk of compare time on big models
    if t.data_type == TensorProto.STRING:
        return b"".join(len(s).to_bytes(8, "little") + s for s in t.string_data)
    return numpy_helper.to_array(t).tobytes()


class DataFiles:
    """Reads initializers' stored bytes from a model's folder, keeping each data file open once.

    Use as a context manager: ``with DataFiles(folder, error=VerifyError) as data: data.chunks(t)``.
    """

    def __init__(self, folder: str | None, *, error: type[LoraFxError] = ExportError) -> None:
        self.folder = folder
        self.error = error
        self._stack = ExitStack()
        self._open: dict[str, IO[bytes]] = {}

    def __enter__(self) -> DataFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def chunks(self, t: TensorProto, size: int = CHUNK) -> bytes | Iterator[bytes]:
        """Inline values as one bytes object, external ones as a stream of chunks of ``size``."""
        return inline_bytes(t) if not is_external(t) else self._stream(t, size)

    def read(self, t: TensorProto) -> bytes:
        """All stored bytes of ``t`` at once."""
        data = self.chunks(t)
        return data if isinstance(data, bytes) else b"".join(data)

    def _stream(self, t: TensorProto, size: int) -> Iterator[bytes]:
        if self.folder is None:
            raise self.error(f"initializer {t.name!r} is in external data but the model was given as a "
                             "ModelProto; pass the .onnx path instead")
        ext = external(t)
        path = os.path.join(self.folder, ext.location)
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(open(path, "rb"))
            except OSError as exc:
                raise self.error(f"cannot read external data {path!r} of initializer {t.name!r}: {exc}") from exc
        handle = self._open[path]
        length = stored_nbytes(t)  # the length field, else from dims and dtype
        handle.seek(ext.offset)
        while length > 0:
            block = handle.read(min(length, size))
            if not block:
                raise self.error(f"external data {path!r} ends before initializer {t.name!r} does")
            length -= len(block)
            yield block
