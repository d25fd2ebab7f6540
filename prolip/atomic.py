"""Crash-safe file writes and the safetensors header reader, shared by every file prolip writes or reads.

Every file prolip writes (delta files, feature-cache entries and packs, merged checkpoints) goes
through :func:`atomic_write`: the bytes are written under a hidden temporary name in the target's
folder (``.prolip-<name>.<random>.tmp``), flushed and fsynced, then moved into place, and the
folder is fsynced so that the move itself survives a crash. Readers therefore see the old file,
the complete new one, or nothing, never a torn file. Two policies:

* ``exclusive=False`` (replace): ``os.replace``; the last writer wins. For files a user names.
* ``exclusive=True`` (first writer wins): ``os.link``, which fails if the target exists, so a
  published file never changes under a reader; used where many processes may write the same
  content (the feature cache). Where hard links are unsupported it falls back to ``os.replace``,
  which is atomic too.

A target that exists but is not a regular file (a symlink, FIFO, device or directory) is refused: a write
would replace it. :func:`check_output` checks a user's output path up front, before any work.

Temporary files are created with mode 0o666 minus the umask, as ``open()`` would, so written
files get the permissions the user expects (``tempfile.mkstemp`` would leave them 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import torch

from prolip.errors import InputError, ProLIPError

TEMP_PREFIX = ".prolip-"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 600  # a temp file this old was left by a killed writer, not one still running


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of ``path``'s temporary files (the target's name ties them to it)."""
    return f"{TEMP_PREFIX}{os.path.basename(os.fspath(path))[:100]}."  # cut to stay under name limits


def remove_stale_temps(folder: str | os.PathLike, prefix: str = TEMP_PREFIX, recursive: bool = False) -> None:
    """Delete temporary files under ``folder`` (names starting with ``prefix``) left by killed writers.

    Only files older than :data:`STALE_TEMP_SECONDS` are removed, so running writers are safe.
    """
    now = time.time()
    walk = os.walk(folder) if recursive else [(os.fspath(folder), [], _listdir(folder))]
    for dirpath, _, names in walk:
        for name in names:
            if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
                stale = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):  # gone already, or not ours to delete: harmless
                    if now - os.stat(stale).st_mtime > STALE_TEMP_SECONDS:
                        os.unlink(stale)


def _listdir(folder: str | os.PathLike) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    what: str = "output",
    folder: bool = False,
) -> None:
    """Refuse, before any work, an output path that cannot or must not be written.

    Refused: a path whose folder does not exist; an existing symlink, FIFO, device or socket (a write would replace
    it with a regular file: ``--out /dev/null`` as root would replace ``/dev/null``); a directory where a file is
    written (or a file where a folder is, with ``folder``); and one of ``inputs`` itself, through any path or link
    (``prolip export d.safetensors --out d.safetensors`` would destroy the delta it reads).

    Raises:
        InputError: naming ``what`` (e.g. ``--out``) and the path, and saying what to do.
    """
    text = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise InputError(f"{what} {text!r}: the folder {parent!r} does not exist; create it first.")
    if os.path.lexists(text):
        if os.path.islink(text):
            kind = "a symbolic link"
        elif folder:
            kind = None if os.path.isdir(text) else "a file, not a folder"
        elif os.path.isdir(text):
            kind = "a directory"
        else:
            kind = None if os.path.isfile(text) else "not a regular file (a FIFO, device or socket)"
        if kind is not None:
            raise InputError(
                f"{what} {text!r} is {kind}; name a {'folder' if folder else 'regular file'} or a new path."
            )
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.exists(text) and os.path.samefile(text, source):
                raise InputError(
                    f"{what} {text!r} is the input {os.fspath(source)!r} itself: writing it would destroy what is "
                    "read; write to another path."
                )


def atomic_write(
    path: str | os.PathLike,
    chunks: Iterable[Any] = (),
    *,
    writer: Callable[[BinaryIO], None] | None = None,
    exclusive: bool = False,
) -> bool:
    """Write ``path`` atomically from byte ``chunks`` and/or by calling ``writer(file)``.

    Args:
        path: the target file; its folder must exist.
        chunks: bytes-like objects written in order.
        writer: called with the open binary file (after ``chunks``), for writers that seek.
        exclusive: first writer wins: keep an existing ``path`` and discard ours. Otherwise
            replace it.

    Returns:
        True if ``path`` now holds what this call wrote (always, unless ``exclusive`` and the
        file already existed).

    Raises:
        OSError: the file cannot be written (callers turn it into an error naming the file).
        InputError: ``path`` exists and is not a regular file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        # Replacing a link, FIFO or device with a regular file is never what the caller meant.
        raise InputError(f"{path!r} is not a regular file (a link, directory, FIFO or device); write to a new path.")
    tmp = os.path.join(folder, f"{temp_prefix(path)}{secrets.token_hex(8)}{TEMP_SUFFIX}")
    # O_EXCL: never write through someone else's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if writer is not None:
                writer(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before its name is
        won = _publish(tmp, path, exclusive)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    return won


def _publish(tmp: str, path: str, exclusive: bool) -> bool:
    if not exclusive:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)  # fails if path exists: a published file is never replaced under a reader
        won = True
    except FileExistsError:
        won = False
    except OSError:  # no hard links on this filesystem: a rename is atomic too, the last writer wins
        os.replace(tmp, path)
        return True
    os.unlink(tmp)
    return won


def safetensors_header(tensors: Iterable[tuple[str, str, Sequence[int], int]], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header (its 8-byte length, then the JSON, padded to 8 bytes) for tensors laid out in order.

    ``tensors`` gives each tensor's name, safetensors dtype ("F32", "F16", "I64", ...), shape and size in bytes;
    their data follows the header in that order. The metadata comes first, its keys sorted: the same input gives
    the same bytes (safetensors' own writer orders metadata by hash, so its files differ from run to run).
    """
    header: dict[str, Any] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64"}


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    """A whole safetensors file of ``tensors`` (torch tensors, by name) and string ``metadata``: the same bytes for
    the same input (:func:`safetensors_header`), tensors in name order."""
    blobs, entries = [], []
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        entries.append((name, _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")], tensor.shape, len(data)))
        blobs.append(data)
    return safetensors_header(entries, metadata) + b"".join(blobs)


def read_safetensors_header(
    path: str | os.PathLike, error: type[ProLIPError], max_bytes: int, what: str
) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its tensor data starts.

    The declared header size is checked against ``max_bytes`` and the file size before anything
    is parsed, so a pickle or a hostile length is refused without reading it. Raises ``error``,
    with a message naming the file and calling it a ``what``.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path!r} is too short ({size} bytes) to be a safetensors {what}; it is truncated or corrupt.")
        (n,) = struct.unpack("<Q", head)
        if n > max_bytes or 8 + n > size:
            raise error(
                f"{path!r} is not a valid safetensors file (declared header of {n} bytes, file of {size} bytes); "
                "it may be truncated, corrupted, or another format such as a pickle."
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise error(f"{path!r} could not be read as a safetensors {what} (malformed header); the file is corrupt.")
    return header, 8 + n


MAX_TEXT_BYTES = 64 * 1024 * 1024  # a class-name, template or CSV file of a user's: far below this


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A user's UTF-8 text file (a byte-order mark dropped), read whole, within bounds.

    Raises:
        InputError: naming ``what`` and the file: missing or unreadable, not a regular file (a FIFO or device such as
            ``/dev/zero`` would block or never end), larger than ``max_bytes``, or not UTF-8.
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"cannot read the {what} {where!r}: it is not a regular file (a FIFO or device).")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read the {what} {where!r}: {exc.strerror or exc}.") from None
    if len(data) > max_bytes:
        raise InputError(f"the {what} {where!r} is larger than {max_bytes >> 20} MiB; it cannot be one.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"the {what} {where!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None


def read_json(path: str | os.PathLike, error: type[ProLIPError], what: str) -> Any:
    """The parsed JSON of ``path``, or ``error`` naming the file, what it should be and the fault.

    Every fault of a hostile or damaged file (unreadable, not UTF-8, invalid JSON, nesting deep enough
    to exhaust the parser's recursion, an integer with more digits than Python converts) is one
    ``error``, never a bare ``OSError``, ``RecursionError`` or ``ValueError``.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise error(f"cannot read the {what} {where!r}: its JSON is nested too deeply.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and the int-digits limit are ValueErrors
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"cannot read the {what} {where!r}: {reason}.") from None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Any:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block, across processes.

    An advisory OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows): the OS drops it when the
    holder exits or is killed, so a crashed run never leaves the file locked. Processes that take
    the lock wait for each other; readers that do not take it are unaffected.
    """
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                    continue
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
