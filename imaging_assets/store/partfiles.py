"""Result files of partitioned steps: one folder per partition, committed atomically by a manifest.

Storage only (no domain package, no Dagster). A partition step may run in any process on any machine that
sees the warehouse's files (a shared folder or object storage, :class:`~imaging_assets.store.objects.ObjectStore`);
it never opens the DuckDB file. It writes its tables as Parquet files with a fresh token in their names,
then the partition's ``_manifest.json`` in one atomic write (locally a temporary file renamed into place;
on S3 one PUT, which readers see whole or not at all): the manifest names the files of the partition's
current version. A reader reads the manifest first, then exactly the files it names, so it sees the
previous version or the new one, never a mix, and a writer killed before its manifest write leaves the
previous version as it was (its orphaned files are removed by the next commit). Re-running a partition
replaces exactly its files.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imaging_assets.store.objects import ObjectStore, store

MANIFEST = "_manifest.json"
INPUTS = "_inputs.json"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class PartitionVersion:
    """One committed version of a partition: its token, metadata and table files (name -> key)."""

    key: str
    token: str
    meta: dict[str, Any]
    files: dict[str, str]
    store: ObjectStore

    def uri(self, table: str) -> str:
        """Path / URI of one table's file (for messages)."""
        return self.store.uri(self.files[table])

    def read(self, table: str) -> pa.Table:
        """One table of this version (Parquet)."""
        with self.store.open_input_file(self.files[table]) as fh:
            return pq.read_table(fh)


def _check_key(key: str) -> str:
    if not _SAFE_KEY.match(key):
        raise ValueError(f"partition key {key!r}: only letters, digits, '_', '.' and '-' are allowed")
    return key


class PartitionFiles:
    """The partitions of one step under ``prefix`` of a store (``<prefix>/<key>/``).

    Parameters
    ----------
    root
        An :class:`~imaging_assets.store.objects.ObjectStore`, or a folder / ``s3://`` URI to open one.
    prefix
        Key prefix of the step's partitions inside the store.
    """

    def __init__(self, root: ObjectStore | str, prefix: str = "") -> None:
        self.store = root if isinstance(root, ObjectStore) else store(root)
        self.prefix = prefix.strip("/")

    def _key(self, key: str, name: str = "") -> str:
        parts = [p for p in (self.prefix, _check_key(key), name) if p]
        return "/".join(parts)

    def folder(self, key: str) -> str:
        """Path / URI of one partition's folder."""
        return self.store.uri(self._key(key))

    def names(self, key: str) -> list[str]:
        """Names of the files in one partition's folder, sorted."""
        return self.store.list(self._key(key))

    def folders(self) -> list[str]:
        """Every partition with a folder (inputs written, committed or not), sorted."""
        return [k for k in self.store.list_dirs(self.prefix) if _SAFE_KEY.match(k)]

    def keys(self) -> list[str]:
        """Partitions with a committed version, sorted."""
        return [k for k in self.store.list_dirs(self.prefix) if _SAFE_KEY.match(k)
                and self.store.exists(self._key(k, MANIFEST))]

    def current(self, key: str) -> PartitionVersion | None:
        """The committed version of a partition, or None when it has none."""
        where = self._key(key, MANIFEST)
        try:
            manifest = json.loads(self.store.read_bytes(where))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.store.uri(where)}: unreadable partition manifest ({exc})") from exc
        return PartitionVersion(key, manifest["token"], manifest.get("meta", {}),
                                {name: self._key(key, fname) for name, fname in manifest["files"].items()},
                                self.store)

    def commit(self, key: str, tables: Mapping[str, pa.Table], meta: Mapping[str, Any]) -> PartitionVersion:
        """Write ``tables`` as the partition's new version and make it current in one manifest write.

        Files of earlier versions (and of writers that died before their commit) are removed afterwards.
        """
        token = uuid.uuid4().hex[:16]
        files: dict[str, str] = {}
        for name, table in tables.items():
            _check_key(name)
            fname = f"{name}-{token}.parquet"
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            self.store.write_bytes(self._key(key, fname), buf.getvalue())
            files[name] = fname
        manifest = {"key": key, "token": token, "files": files, "meta": dict(meta)}
        self.store.write_bytes(self._key(key, MANIFEST), json.dumps(manifest, sort_keys=True, default=str).encode())
        keep = set(files.values()) | {MANIFEST, INPUTS}
        for name in self.names(key):
            if name not in keep:
                self.store.delete(self._key(key, name))
        return PartitionVersion(key, token, dict(meta), {n: self._key(key, f) for n, f in files.items()}, self.store)

    def write_inputs(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Write a partition's input description (``<key>/_inputs.json``, atomic); False when unchanged."""
        data = json.dumps(payload, sort_keys=True, default=str).encode()
        where = self._key(key, INPUTS)
        try:
            if self.store.read_bytes(where) == data:
                return False
        except FileNotFoundError:
            pass
        self.store.write_bytes(where, data)
        return True

    def read_inputs(self, key: str) -> dict[str, Any]:
        """A partition's input description; names the file when it is missing or unreadable."""
        where = self._key(key, INPUTS)
        try:
            return json.loads(self.store.read_bytes(where))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.store.uri(where)}: no inputs for partition {key!r} (materialize "
                                    "`lesions` first: it assigns series to batches and writes their inputs)") from exc
        except ValueError as exc:
            raise ValueError(f"{self.store.uri(where)}: unreadable partition inputs ({exc})") from exc
