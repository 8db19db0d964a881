"""Blob stores: immutable objects by key, chosen by URL: `file:///path` (a local folder, the default) or
`s3://bucket/prefix` (any S3-compatible server through boto3; `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`
point it at MinIO, SeaweedFS and the like, credentials come from boto3's usual chain).

Objects are written once: `put_file`/`put_bytes` refuse an existing key (`BlobExistsError`; S3's
conditional `If-None-Match: *`, a hard link on a folder), so a writer can never overwrite what another
committed, and a reader never sees a partial object (S3 PUTs are atomic; files are written aside, fsynced,
then linked into place). Keys are relative, '/'-separated, made of safe characters only.

An unreachable server becomes `StorageUnavailableError` (the HTTP layer's 503).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .database import StorageUnavailableError

_KEY_RE = re.compile(r"[A-Za-z0-9._:=+-]+(/[A-Za-z0-9._:=+-]+)*")
_CHUNK_BYTES = 1 << 20


class BlobExistsError(FileExistsError):
    """A write-once key already holds an object."""


class BlobNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    num_bytes: int
    modified: float  # unix time


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or any(p in (".", "..") for p in key.split("/")):
        raise ValueError(f"not a safe blob key: {key!r}")
    return key


class BlobStore:
    url: str

    def put_file(self, key: str, path: Path) -> str:
        """Write the file at `path` as the new object `key`; -> its sha256 (hex)."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> str:
        raise NotImplementedError

    def get_file(self, key: str, dst: Path) -> str:
        """Download `key` to the new file `dst` (written aside, then renamed); -> its sha256."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str) -> list[BlobInfo]:
        """Every object whose key starts with `prefix` (a folder: end it with '/')."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove `key` (no error when absent)."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for info in self.list(prefix):
            self.delete(info.key)
            n += 1
        return n

    def local_path(self, key: str) -> Path | None:
        """The object as a local file when the store is a folder (read it in place), else None."""
        return None

    def close(self) -> None:
        pass


class FileBlobStore(BlobStore):
    """Objects as files under `root` (key a/b/c -> root/a/b/c); staging files under root/.tmp."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> str:
        with open(path, "rb") as src:
            return self._put(key, src)

    def put_bytes(self, key: str, data: bytes) -> str:
        import io
        return self._put(key, io.BytesIO(data))

    def _put(self, key: str, src) -> str:
        final = self._path(key)
        if final.exists():
            raise BlobExistsError(key)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            new_dirs = [p for p in reversed(final.parents) if p != self.root and self.root in p.parents
                        and not p.exists()]
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, final)  # atomic and create-only: fails when another writer got there first
            except FileExistsError:
                raise BlobExistsError(key) from None
            _fsync_dir(final.parent)
            for d in new_dirs:
                _fsync_dir(d.parent)
        finally:
            os.unlink(tmp)
        return digest.hexdigest()

    def get_file(self, key: str, dst: Path) -> str:
        src = self._path(key)
        if not src.is_file():
            raise BlobNotFoundError(key)
        return _copy_aside(open(src, "rb"), Path(dst))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise BlobNotFoundError(key) from None

    def list(self, prefix: str) -> list[BlobInfo]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root  # the deepest folder named
        if not base.is_dir():
            return []
        out = []
        for path in base.rglob("*"):
            if path.is_file() and self._tmp not in path.parents:
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = path.stat()
                    out.append(BlobInfo(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda b: b.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and self.root in parent.parents:  # drop folders left empty
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def sweep_staging(self, older_than_s: float = 3600.0) -> None:
        """Staging files of writers that crashed (only old ones: another process may be writing)."""
        cutoff = time.time() - older_than_s
        for path in self._tmp.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass


class S3BlobStore(BlobStore):
    """Objects under `s3://bucket/prefix/`; the bucket is created when missing."""

    def __init__(self, bucket: str, prefix: str = "", *, client=None, create_bucket: bool = True) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ValueError("an s3:// blob store needs boto3: pip install 'loraplex[cluster]'") from e
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # the classic client (no CRT transfer manager: it drops custom endpoints on some hosts); short
        # timeouts and few retries, so an outage is an error in seconds rather than a hang
        self._s3 = client or boto3.client("s3", config=Config(connect_timeout=3, read_timeout=30,
                                                              retries={"max_attempts": 2, "mode": "standard"},
                                                              s3={"addressing_style": "path"}))
        if create_bucket:
            with self._errors():
                try:
                    self._s3.head_bucket(Bucket=bucket)
                except self._s3.exceptions.ClientError as e:
                    if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
                        raise
                    try:
                        self._s3.create_bucket(Bucket=bucket)
                    except self._s3.exceptions.ClientError as e2:
                        if _code(e2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self):
        return _s3_errors(self.url)

    def put_file(self, key: str, path: Path) -> str:
        digest = _sha256_file(path)
        with open(path, "rb") as body:
            self._put(key, body)
        return digest

    def put_bytes(self, key: str, data: bytes) -> str:
        self._put(key, data)
        return hashlib.sha256(data).hexdigest()

    def _put(self, key: str, body) -> None:
        with self._errors():
            try:
                self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*")
            except self._s3.exceptions.ClientError as e:
                if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise BlobExistsError(key) from None
                raise

    def _get(self, key: str):
        with self._errors():
            try:
                return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except self._s3.exceptions.ClientError as e:
                if _code(e) in ("NoSuchKey", "404", "NotFound"):
                    raise BlobNotFoundError(key) from None
                raise

    def get_file(self, key: str, dst: Path) -> str:
        body = self._get(key)
        with self._errors():
            return _copy_aside(body, Path(dst))

    def get_bytes(self, key: str) -> bytes:
        body = self._get(key)
        with self._errors():
            try:
                return body.read()
            finally:
                body.close()

    def list(self, prefix: str) -> list[BlobInfo]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        with self._errors():
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=(f"{self.prefix}/{prefix}" if self.prefix else prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(BlobInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(out, key=lambda b: b.key)

    def delete(self, key: str) -> None:
        with self._errors():
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        self._s3.close()


def open_blob_store(url: str | None, *, default_root: Path | None = None) -> BlobStore:
    """`file:///path`, `s3://bucket[/prefix]`; None or "" with `default_root`: that folder."""
    if not url:
        if default_root is None:
            raise ValueError("no blob store URL given")
        return FileBlobStore(default_root)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(f"--blob-store {url!r}: use file:///absolute/path")
        return FileBlobStore(Path(parts.path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"--blob-store {url!r}: use s3://bucket or s3://bucket/prefix")
        return S3BlobStore(parts.netloc, parts.path)
    raise ValueError(f"--blob-store {url!r}: use file:///path or s3://bucket/prefix")


class _s3_errors:
    """botocore's connection failures -> StorageUnavailableError."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import (
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )
        if isinstance(exc, (BotoConnectionError, EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            raise StorageUnavailableError(f"the blob store {self.url} is unavailable: {exc}") from exc
        return False


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _copy_aside(src, dst: Path) -> str:
    """Stream `src` (a readable, closed here) to `dst` through a temp file beside it; -> sha256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    digest = hashlib.sha256()
    try:
        with src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
