"""The warehouse's files on a local folder or on object storage (S3 and S3-compatible servers).

Storage only (no domain package, no Dagster). Everything the warehouse keeps as files -- per-partition
result files, thumbnails, lesion crops, model checkpoints, plots, the Lance and Delta tables -- lives under
one root URI: a local folder, or ``s3://bucket/prefix``. The DuckDB file never does (DuckDB needs a local
file with locks); :class:`~imaging_assets.store.warehouse.Warehouse` keeps it on local disk.

* :class:`S3Options` -- endpoint, region and credentials, from the standard AWS environment variables
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``) or given explicitly (the Dagster resource passes its
  ``dg.EnvVar`` fields); it renders them for each client: pyarrow's ``S3FileSystem`` and the
  ``storage_options`` of Lance and delta-rs (both Rust ``object_store``).
* :func:`configure` / :func:`storage_options` -- the options registered for a root URI, found by prefix
  for any URI below it, so the Lance and Delta code that takes a plain URI finds them.
* :class:`ObjectStore` -- bytes in and out by key under the root: ``write_bytes`` is atomic on both
  backends (a local temporary file renamed into place; on S3 one PUT, which a reader sees whole or not at
  all), ``read_bytes``, ``exists``, ``list``, ``delete``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

#: URI schemes served by :class:`ObjectStore` besides local paths.
REMOTE_SCHEMES = ("s3",)


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for an object-store URI (``s3://...``), False for a local path (or ``file://``)."""
    text = os.fspath(uri)
    return "://" in text and not text.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """``uri`` joined with key parts by ``/`` (a local path stays a path string)."""
    if not parts:
        return uri
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(uri, *parts))


@dataclass(frozen=True)
class S3Options:
    """Where an S3 server is and who we are on it (secrets stay out of ``repr``).

    Parameters
    ----------
    endpoint_url
        Endpoint of an S3-compatible server (``http://127.0.0.1:9000``); empty for AWS itself.
    region
        Region name; ``us-east-1`` when empty.
    access_key_id, secret_access_key, session_token
        Credentials; empty = the client's own chain (instance profile, ``~/.aws``).
    """

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Options:
        """The options from the standard AWS environment variables."""
        env = os.environ if env is None else env
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL", ""),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", ""),
            access_key_id=env.get("AWS_ACCESS_KEY_ID", ""),
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=env.get("AWS_SESSION_TOKEN", ""),
        )

    @property
    def allow_http(self) -> bool:
        """A plain-HTTP endpoint (a local test server)."""
        return self.endpoint_url.startswith("http://")

    def object_store(self) -> dict[str, str]:
        """``storage_options`` for Lance and delta-rs (the Rust ``object_store`` configuration keys).

        Conditional writes: ``object_store`` commits with ``If-None-Match: *`` PUTs (Lance's manifests,
        delta-rs' ``_delta_log`` entries with ``conditional_put``), so two writers can never both commit
        the same version; the server must support them (AWS S3 does, as do moto and MinIO).
        """
        opts = {"aws_region": self.region or "us-east-1", "aws_conditional_put": "etag"}
        if self.endpoint_url:
            opts["aws_endpoint"] = self.endpoint_url
            opts["aws_virtual_hosted_style_request"] = "false"
        if self.allow_http:
            opts["allow_http"] = "true"
        if self.access_key_id:
            opts["aws_access_key_id"] = self.access_key_id
            opts["aws_secret_access_key"] = self.secret_access_key
        if self.session_token:
            opts["aws_session_token"] = self.session_token
        return opts

    def pyarrow_fs(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` with these options."""
        from pyarrow import fs

        kwargs: dict[str, Any] = {"region": self.region or "us-east-1"}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if self.access_key_id:
            kwargs["access_key"] = self.access_key_id
            kwargs["secret_key"] = self.secret_access_key
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return fs.S3FileSystem(**kwargs)


_OPTIONS: dict[str, S3Options] = {}
_OPTIONS_LOCK = threading.Lock()


def configure(uri: str, options: S3Options) -> None:
    """Register the S3 options of everything under ``uri`` (later calls for the same root replace them)."""
    if is_remote(uri):
        with _OPTIONS_LOCK:
            _OPTIONS[uri.rstrip("/")] = options


def s3_options(uri: str | os.PathLike[str]) -> S3Options:
    """The options registered for the longest root above ``uri``, else those of the environment."""
    text = os.fspath(uri).rstrip("/")
    with _OPTIONS_LOCK:
        best = max((root for root in _OPTIONS if text == root or text.startswith(root + "/")), key=len,
                   default=None)
        if best is not None:
            return _OPTIONS[best]
    return S3Options.from_env()


def storage_options(uri: str | os.PathLike[str]) -> dict[str, str] | None:
    """``storage_options`` for Lance / delta-rs at ``uri``: None for a local path."""
    if not is_remote(uri):
        return None
    scheme = urlparse(os.fspath(uri)).scheme
    if scheme not in REMOTE_SCHEMES:
        return None  # gs://, az://: the client's own environment variables
    return s3_options(uri).object_store()


class ObjectStore:
    """Files by key (``"thumbnails/abc.png"``) under a root folder or ``s3://bucket/prefix``."""

    def __init__(self, root: str | os.PathLike[str], options: S3Options | None = None) -> None:
        text = os.fspath(root)
        self.root = text.rstrip("/") if is_remote(text) else str(Path(text).expanduser().absolute())
        self.remote = is_remote(self.root)
        if self.remote:
            parsed = urlparse(self.root)
            if parsed.scheme not in REMOTE_SCHEMES:
                raise ValueError(f"{self.root}: object storage must be s3:// (or a local folder)")
            if not parsed.netloc:
                raise ValueError(f"{self.root}: no bucket in the URI (expected s3://bucket/prefix)")
            self._options = options or s3_options(self.root)
            self._fs = self._options.pyarrow_fs()
            self._base = (parsed.netloc + parsed.path).rstrip("/")
        else:
            from pyarrow import fs

            self._options = None
            self._fs = fs.LocalFileSystem()
            self._base = self.root

    def __repr__(self) -> str:
        return f"ObjectStore({self.root!r})"

    # -- names ---------------------------------------------------------------------------------------
    def uri(self, key: str = "") -> str:
        """The URI (or local path) of a key."""
        return join(self.root, key) if key else self.root

    def local_path(self, key: str = "") -> Path | None:
        """The local path of a key, None on object storage."""
        return None if self.remote else Path(self.uri(key))

    def _path(self, key: str) -> str:
        key = key.strip("/")
        if not key:
            return self._base
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"{key!r}: not a plain key under {self.root}")
        return f"{self._base}/{key}"

    # -- bytes ---------------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        """The content of a key; ``FileNotFoundError`` naming the URI when there is none."""
        try:
            with self._fs.open_input_stream(self._path(key)) as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.uri(key)}: no such file") from exc
        except OSError as exc:
            if "not found" in str(exc).lower() or "nosuchkey" in str(exc).lower().replace(" ", ""):
                raise FileNotFoundError(f"{self.uri(key)}: no such file") from exc
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a key atomically: readers see the old content or the new, never part of it."""
        path = self._path(key)
        if not self.remote:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with self._fs.open_output_stream(path) as fh:  # one PUT (or a multipart upload) completed on close
            fh.write(data)

    def exists(self, key: str) -> bool:
        """True when the key is a file."""
        from pyarrow import fs

        return self._fs.get_file_info(self._path(key)).type == fs.FileType.File

    def list(self, prefix: str = "", recursive: bool = False) -> list[str]:
        """Keys of the files directly under ``prefix`` (``recursive``: at any depth), relative to it, sorted."""
        from pyarrow import fs

        base = self._path(prefix)
        try:
            infos = self._fs.get_file_info(fs.FileSelector(base, allow_not_found=True, recursive=recursive))
        except FileNotFoundError:
            return []
        return sorted(i.path[len(base):].lstrip("/") for i in infos if i.type == fs.FileType.File)

    def list_times(self, prefix: str = "") -> dict[str, float]:
        """Files directly under ``prefix`` -> their modification time (seconds since the epoch)."""
        from pyarrow import fs

        base = self._path(prefix)
        try:
            infos = self._fs.get_file_info(fs.FileSelector(base, allow_not_found=True))
        except FileNotFoundError:
            return {}
        return {i.path[len(base):].lstrip("/"): (i.mtime.timestamp() if i.mtime is not None else 0.0)
                for i in infos if i.type == fs.FileType.File}

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the folders (common prefixes) directly under ``prefix``, sorted."""
        from pyarrow import fs

        base = self._path(prefix)
        try:
            infos = self._fs.get_file_info(fs.FileSelector(base, allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(i.path[len(base):].strip("/") for i in infos if i.type == fs.FileType.Directory)

    def delete(self, key: str) -> None:
        """Remove a key (nothing when absent)."""
        try:
            self._fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                raise

    def open_input_file(self, key: str) -> Any:
        """A seekable pyarrow file of a key (for Parquet reads without loading the whole file first)."""
        return self._fs.open_input_file(self._path(key))

    def filesystem(self) -> tuple[Any, str]:
        """The pyarrow filesystem and the base path of the root on it."""
        return self._fs, self._base


_STORES: dict[tuple[str, S3Options | None], ObjectStore] = {}


def store(root: str | os.PathLike[str], options: S3Options | None = None) -> ObjectStore:
    """The :class:`ObjectStore` of ``root``, cached per process (its S3 client keeps connections open)."""
    key = (os.fspath(root), options if options is not None else (s3_options(root) if is_remote(root) else None))
    with _OPTIONS_LOCK:
        found = _STORES.get(key)
    if found is None:
        found = ObjectStore(root, key[1])
        with _OPTIONS_LOCK:
            _STORES[key] = found
    return found
