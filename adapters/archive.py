"""Safe extraction of an uploaded adapter archive (.zip or .tar.gz): validate every member, then write."""
from __future__ import annotations

import gzip
import os
import pathlib
import re
import shutil
import stat
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from loraplex.adapters.errors import AdapterError, AdapterTooLargeError

MiB = 1 << 20
GiB = 1 << 30
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Formats that unpickle on load: an upload must never make us (or a user's tool) load one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".joblib")

_CHUNK_BYTES = 1 * MiB
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip
_GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_OFFSET = 257  # "ustar" sits here in an uncompressed tar
# tarfile reads pax and GNU long-name headers whole into memory; bound what one header may cost.
_TAR_HEADER_BUDGET_BYTES = 1 * MiB
# Central-directory bytes allowed per entry: 46 fixed + name (<= 1 KiB, see below) + extra + comment.
_ZIP_DIRECTORY_BYTES_PER_ENTRY = 4096
_MAX_NAME_BYTES = 1024
_MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux; longer fails at write time with an OSError
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_MACOS_JUNK_DIR = "__MACOSX"  # Finder adds it to every zip; validated like the rest, never written
# Errors the stdlib readers raise on corrupt input; they become a 400, not a 500.
_CORRUPT_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, zlib.error,
                   gzip.BadGzipFile, EOFError, NotImplementedError, UnicodeError, struct.error, ValueError)


@dataclass(frozen=True, slots=True)
class UploadLimits:
    max_archive_bytes: int = 512 * MiB
    max_total_bytes: int = 1 * GiB  # sum of decompressed file sizes
    max_file_bytes: int = 1 * GiB
    max_files: int = 32

    def __post_init__(self) -> None:
        for field in ("max_archive_bytes", "max_total_bytes", "max_file_bytes", "max_files"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"UploadLimits.{field} must be a positive integer, got {value!r}.")

    @property
    def max_entries(self) -> int:
        # Directories are members too; bound them so an archive of a million empty dirs is refused.
        return 4 * self.max_files + 16


def extract_adapter_archive(src: pathlib.Path, dest: pathlib.Path, limits: UploadLimits) -> pathlib.Path:
    """Extract the archive file `src` into the existing empty directory `dest` and return the folder
    holding adapter_config.json (dest itself or the archive's single top-level folder). Raises
    AdapterError / AdapterTooLargeError with one line naming the offending member; on any error
    dest is left empty."""
    dest_root = pathlib.Path(dest).resolve(strict=True)
    if not dest_root.is_dir() or any(dest_root.iterdir()):
        # A caller bug, not the client's: never empty a folder we did not start empty.
        raise ValueError(f"{dest} must be an existing empty directory.")
    try:
        if _sniff(pathlib.Path(src), limits) == "zip":
            root_parts = _extract_zip(pathlib.Path(src), dest_root, limits)
        else:
            root_parts = _extract_tar(pathlib.Path(src), dest_root, limits)
    except BaseException as exc:
        _empty_dir(dest_root)
        if isinstance(exc, AdapterError) or not isinstance(exc, _CORRUPT_ERRORS):
            raise
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AdapterError(f"The upload is not a readable archive: {detail}", param="file") from exc
    return pathlib.Path(dest).joinpath(*root_parts)


def _sniff(src: pathlib.Path, limits: UploadLimits) -> str:
    """Return "zip" or "tar.gz" from the magic bytes; the file name is the client's and may lie."""
    with src.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_archive_bytes:
            raise AdapterTooLargeError(
                f"The archive is {size} bytes; the limit is {limits.max_archive_bytes} bytes.", param="file")
        head = f.read(_TAR_MAGIC_OFFSET + 8)
    if head[:4] in _ZIP_MAGICS:
        return "zip"
    if head[:2] == _GZIP_MAGIC:
        return "tar.gz"
    hint = " (an uncompressed tar; compress it with gzip)" if head[_TAR_MAGIC_OFFSET:][:5] == b"ustar" else ""
    raise AdapterError(f"The upload is not a .zip or .tar.gz archive{hint}.", param="file")


def _show(name: str) -> str:
    # repr() keeps control characters from breaking the one-line message or the logs.
    shown = repr(name)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _check_name(raw: str) -> tuple[str, ...]:
    """Validate a member name and return its path components ("." dropped; () means the root)."""
    shown = _show(raw)
    if not raw:
        raise AdapterError("An archive member has an empty name.", param="file")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in raw):
        raise AdapterError(f"Archive member {shown} has a NUL, control or undecodable character in its name.",
                           param="file")
    if "\\" in raw:
        raise AdapterError(f"Archive member {shown} has a backslash in its name; use '/' separators.",
                           param="file")
    if raw.startswith("/") or _DRIVE_RE.match(raw):
        raise AdapterError(f"Archive member {shown} has an absolute path; paths must be relative.", param="file")
    if len(raw.encode()) > _MAX_NAME_BYTES:
        raise AdapterError(f"Archive member {shown} has a name longer than {_MAX_NAME_BYTES} bytes.", param="file")
    parts: list[str] = []
    for part in (raw[:-1] if raw.endswith("/") else raw).split("/"):
        if part == "..":
            raise AdapterError(f"Archive member {shown} has a '..' component; paths must stay inside the archive.",
                               param="file")
        if part == "":
            raise AdapterError(f"Archive member {shown} has an empty path component.", param="file")
        if len(part.encode()) > _MAX_COMPONENT_BYTES:
            raise AdapterError(f"Archive member {shown} has a path component over {_MAX_COMPONENT_BYTES} bytes.",
                               param="file")
        if part != ".":  # tar archives made with `tar -C dir .` prefix every name with "./"
            parts.append(part)
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class _Member:
    parts: tuple[str, ...]
    is_dir: bool
    shown: str


class _Plan:
    """Every member, validated before the first byte is written: names, types, counts, declared sizes."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.files: set[tuple[str, ...]] = set()
        self.explicit_dirs: set[tuple[str, ...]] = set()
        self.all_dirs: set[tuple[str, ...]] = set()  # explicit plus every file's parents
        self.num_entries = 0
        self.declared_total_bytes = 0

    def add(self, raw: str, is_dir: bool, declared_bytes: int) -> _Member | None:
        """Validate one member; None for the archive root entry ("./"), which needs no writing."""
        limits, shown = self.limits, _show(raw)
        self.num_entries += 1
        if self.num_entries > limits.max_entries:
            raise AdapterTooLargeError(f"The archive has more than {limits.max_entries} entries.", param="file")
        parts = _check_name(raw)
        if not parts:
            if is_dir:
                return None
            raise AdapterError(f"Archive member {shown} has an empty file name.", param="file")
        if parts[-1].lower().endswith(PICKLE_SUFFIXES):
            raise AdapterError(f"Archive member {shown} is a pickle-format file; uploads must carry weights as "
                               f"{WEIGHTS_NAME} (pickles are never loaded).", param="file")
        if parts in self.files or parts in self.explicit_dirs or (not is_dir and parts in self.all_dirs):
            raise AdapterError(f"Archive member {shown} appears more than once.", param="file")
        for i in range(1, len(parts)):
            if parts[:i] in self.files:
                raise AdapterError(f"Archive member {shown} lies inside {_show('/'.join(parts[:i]))}, "
                                   "which is a file.", param="file")
            self.all_dirs.add(parts[:i])
        if is_dir:
            self.explicit_dirs.add(parts)
            self.all_dirs.add(parts)
            return _Member(parts, True, shown)
        self.files.add(parts)
        if len(self.files) > limits.max_files:
            raise AdapterTooLargeError(f"The archive has more than {limits.max_files} files "
                                       f"(at {shown}).", param="file")
        if declared_bytes > limits.max_file_bytes:
            raise AdapterTooLargeError(f"Archive member {shown} is {declared_bytes} bytes uncompressed; the limit "
                                       f"is {limits.max_file_bytes} bytes.", param="file")
        self.declared_total_bytes += declared_bytes
        if self.declared_total_bytes > limits.max_total_bytes:
            raise AdapterTooLargeError(f"The archive holds more than {limits.max_total_bytes} bytes uncompressed "
                                       f"(at {shown}).", param="file")
        return _Member(parts, False, shown)

    def adapter_root(self) -> tuple[str, ...]:
        """The folder holding adapter_config.json: the archive root or its single top-level folder."""
        tops = {p[0] for p in self.files | self.all_dirs if p[0] != _MACOS_JUNK_DIR}
        if (CONFIG_NAME,) in self.files:
            root: tuple[str, ...] = ()
        elif len(tops) == 1 and (top := next(iter(tops)),) in self.all_dirs and (top, CONFIG_NAME) in self.files:
            root = (top,)
        else:
            raise AdapterError(f"The archive has no {CONFIG_NAME} at its top level or in a single top-level "
                               "folder.", param="file")
        if root + (WEIGHTS_NAME,) not in self.files:
            raise AdapterError(f"The archive has no {WEIGHTS_NAME} next to {CONFIG_NAME}; uploads must carry "
                               f"weights as {WEIGHTS_NAME}.", param="file")
        return root


class _Writer:
    """Writes members under dest, counting the bytes actually written (header sizes may lie)."""

    def __init__(self, dest_root: pathlib.Path, limits: UploadLimits) -> None:
        self.dest_root = dest_root
        self.limits = limits
        self.total_bytes = 0

    def _path(self, member: _Member) -> pathlib.Path:
        path = self.dest_root.joinpath(*member.parts)
        # Names are already checked; this guards against anything the checks missed.
        if not path.resolve().is_relative_to(self.dest_root) or path.resolve() == self.dest_root:
            raise AdapterError(f"Archive member {member.shown} resolves outside the archive.", param="file")
        return path

    def write(self, member: _Member, stream: BinaryIO | None) -> None:
        if member.parts[0] == _MACOS_JUNK_DIR:
            return
        path = self._path(member)
        if member.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            return
        assert stream is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        num_bytes = 0
        with open(path, "xb") as out:
            while chunk := self._read(member, stream):
                num_bytes += len(chunk)
                self.total_bytes += len(chunk)
                if num_bytes > self.limits.max_file_bytes:
                    raise AdapterTooLargeError(f"Archive member {member.shown} decompresses to more than "
                                               f"{self.limits.max_file_bytes} bytes.", param="file")
                if self.total_bytes > self.limits.max_total_bytes:
                    raise AdapterTooLargeError(f"The archive decompresses to more than "
                                               f"{self.limits.max_total_bytes} bytes (at {member.shown}).",
                                               param="file")
                out.write(chunk)

    @staticmethod
    def _read(member: _Member, stream: BinaryIO) -> bytes:
        try:
            return stream.read(_CHUNK_BYTES)
        except AdapterError:
            raise
        except _CORRUPT_ERRORS as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise AdapterError(f"Archive member {member.shown} is corrupt: {detail}", param="file") from exc


def _check_zip_directory(f: BinaryIO, limits: UploadLimits) -> None:
    """Bound the central directory before zipfile parses all of it into memory."""
    size = f.seek(0, os.SEEK_END)
    tail_len = min(size, 22 + 0xFFFF + 20)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    # Same search as zipfile: the end record without a comment, else the last signature.
    pos = len(tail) - 22 if tail[-22:-18] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + 22 > len(tail):
        return  # zipfile reports the corruption
    num_entries, directory_bytes = struct.unpack_from("<HI", tail, pos + 10)
    locator = pos - 20
    if (num_entries == 0xFFFF or directory_bytes == 0xFFFFFFFF) and locator >= 0 \
            and tail[locator:locator + 4] == b"PK\x06\x07":
        (record_offset,) = struct.unpack_from("<Q", tail, locator + 8)
        f.seek(record_offset)
        record = f.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            num_entries, directory_bytes = struct.unpack_from("<QQ", record, 32)
    if num_entries > limits.max_entries or directory_bytes > limits.max_entries * _ZIP_DIRECTORY_BYTES_PER_ENTRY:
        raise AdapterTooLargeError(f"The archive has more than {limits.max_entries} entries.", param="file")


def _zip_is_dir(info: zipfile.ZipInfo) -> bool:
    raw, shown = info.orig_filename, _show(info.orig_filename)
    if info.flag_bits & 0x1:
        raise AdapterError(f"Archive member {shown} is encrypted.", param="file")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise AdapterError(f"Archive member {shown} uses compression method {info.compress_type}; "
                           "use stored or deflate.", param="file")
    is_dir = raw.endswith("/")
    mode = info.external_attr >> 16
    # Only Unix-made zips carry a file type; we never create links, so others are written as files.
    if info.create_system == 3 and stat.S_IFMT(mode):
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "symlink" if stat.S_ISLNK(mode) else "special file"
            raise AdapterError(f"Archive member {shown} is a {kind}; only regular files and directories are "
                               "allowed.", param="file")
        if stat.S_ISDIR(mode) != is_dir:
            raise AdapterError(f"Archive member {shown} has a type that does not match its name.", param="file")
    return is_dir


def _extract_zip(src: pathlib.Path, dest_root: pathlib.Path, limits: UploadLimits) -> tuple[str, ...]:
    with src.open("rb") as f:
        _check_zip_directory(f, limits)
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            plan = _Plan(limits)
            members = [(info, plan.add(info.orig_filename, _zip_is_dir(info), info.file_size))
                       for info in zf.infolist()]
            root = plan.adapter_root()
            writer = _Writer(dest_root, limits)
            for info, member in members:
                if member is None:
                    continue
                if member.is_dir:
                    writer.write(member, None)
                else:
                    with zf.open(info) as stream:
                        writer.write(member, stream)
    return root


class _BoundedReader:
    """The decompressed tar stream, refusing to read past `limit_bytes` (tar and gzip bombs)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.num_read_bytes = 0
        self.limit_bytes = _TAR_HEADER_BUDGET_BYTES

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and 0 <= size <= _CHUNK_BYTES else _CHUNK_BYTES)
        self.num_read_bytes += len(data)
        if self.num_read_bytes > self.limit_bytes:
            raise AdapterTooLargeError("The tar stream is larger than its members declare "
                                       "(an oversized header or a tar bomb).", param="file")
        return data


def _iter_tar(src: pathlib.Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Stream the members; the reader may go only as far as the declared sizes plus a header budget."""
    with src.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        reader = _BoundedReader(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
            previous = None
            while (info := _next_tar_member(tf, previous)) is not None:
                previous = info
                # Callers refuse a bad info.size before reading any data, so raising the bound here is safe.
                padded_bytes = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                reader.limit_bytes = info.offset_data + padded_bytes + _TAR_HEADER_BUDGET_BYTES
                yield tf, info


def _next_tar_member(tf: tarfile.TarFile, previous: tarfile.TarInfo | None) -> tarfile.TarInfo | None:
    try:
        return tf.next()
    except AdapterError:
        raise
    except _CORRUPT_ERRORS as exc:
        if previous is None:
            raise
        # Name the member whose data ran short or whose successor's header is broken.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AdapterError(f"The archive is corrupt after member {_show(previous.name)}: {detail}",
                           param="file") from exc


def _tar_is_dir(info: tarfile.TarInfo) -> bool:
    if info.issparse():
        raise AdapterError(f"Archive member {_show(info.name)} is a sparse file; only regular files and "
                           "directories are allowed.", param="file")
    if info.isreg():
        return False
    if info.isdir():
        return True
    kind = ("symlink" if info.issym() else "hardlink" if info.islnk() else "character device" if info.ischr()
            else "block device" if info.isblk() else "fifo" if info.isfifo() else f"member of type {info.type!r}")
    raise AdapterError(f"Archive member {_show(info.name)} is a {kind}; only regular files and directories are "
                       "allowed.", param="file")


def _extract_tar(src: pathlib.Path, dest_root: pathlib.Path, limits: UploadLimits) -> tuple[str, ...]:
    # Two passes over the stream: the first validates every header, the second writes.
    plan = _Plan(limits)
    for _, info in _iter_tar(src):
        plan.add(info.name, _tar_is_dir(info), info.size)
    root = plan.adapter_root()
    check = _Plan(limits)  # the same checks again: the second pass must read what the first approved
    writer = _Writer(dest_root, limits)
    for tf, info in _iter_tar(src):
        member = check.add(info.name, _tar_is_dir(info), info.size)
        if member is None:
            continue
        writer.write(member, None if member.is_dir else tf.extractfile(info))
    if check.files != plan.files or check.all_dirs != plan.all_dirs:
        raise AdapterError("The archive changed between reads.", param="file")
    return root


def _empty_dir(path: pathlib.Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
