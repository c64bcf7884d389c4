"""Result files of partitioned steps: one folder per partition, committed atomically by a manifest.

Storage only (no domain package, no Dagster). A partition step may run in any process on any machine that
sees the warehouse folder; it never opens the DuckDB file. It writes its tables as Parquet files with a
fresh token in their names, then the partition's ``_manifest.json`` (written to a temporary name and moved
into place, an atomic rename): the manifest names the files of the partition's current version. A reader
reads the manifest first, then exactly the files it names, so it sees the previous version or the new
one, never a mix, and a writer killed before its rename leaves the previous version as it was (its
orphaned files are removed by the next commit). Re-running a partition replaces exactly its files.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
INPUTS = "_inputs.json"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class PartitionVersion:
    """One committed version of a partition: its token, metadata and table files (name -> path)."""

    key: str
    token: str
    meta: dict[str, Any]
    files: dict[str, Path]

    def read(self, table: str) -> pa.Table:
        """One table of this version (Parquet)."""
        return pq.read_table(self.files[table])


def _check_key(key: str) -> str:
    if not _SAFE_KEY.match(key):
        raise ValueError(f"partition key {key!r}: only letters, digits, '_', '.' and '-' are allowed")
    return key


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class PartitionFiles:
    """The partitions of one step under ``root`` (``<root>/<key>/``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        """The folder of one partition."""
        return self.root / _check_key(key)

    def keys(self) -> list[str]:
        """Partitions with a committed version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def current(self, key: str) -> PartitionVersion | None:
        """The committed version of a partition, or None when it has none."""
        folder = self.folder(key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder / MANIFEST}: unreadable partition manifest ({exc})") from exc
        return PartitionVersion(key, manifest["token"], manifest.get("meta", {}),
                                {name: folder / fname for name, fname in manifest["files"].items()})

    def commit(self, key: str, tables: Mapping[str, pa.Table], meta: Mapping[str, Any]) -> PartitionVersion:
        """Write ``tables`` as the partition's new version and make it current in one rename.

        Files of earlier versions (and of writers that died before their commit) are removed afterwards.
        """
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:16]
        files: dict[str, str] = {}
        for name, table in tables.items():
            _check_key(name)
            fname = f"{name}-{token}.parquet"
            tmp = folder / f".{fname}.tmp"
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, folder / fname)
            files[name] = fname
        manifest = {"key": key, "token": token, "files": files, "meta": dict(meta)}
        _atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, sort_keys=True, default=str).encode())
        keep = set(files.values()) | {MANIFEST, INPUTS}
        for p in folder.iterdir():
            if p.name not in keep:
                p.unlink(missing_ok=True)
        return PartitionVersion(key, token, dict(meta), {n: folder / f for n, f in files.items()})

    def write_inputs(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Write a partition's input description (``<key>/_inputs.json``, atomic); False when unchanged."""
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(payload, sort_keys=True, default=str).encode()
        path = folder / INPUTS
        if path.is_file() and path.read_bytes() == data:
            return False
        _atomic_write_bytes(path, data)
        return True

    def read_inputs(self, key: str) -> dict[str, Any]:
        """A partition's input description; names the file when it is missing or unreadable."""
        path = self.folder(key) / INPUTS
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: no inputs for partition {key!r} (materialize `lesions` first: it "
                                    "assigns series to batches and writes their inputs)") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: unreadable partition inputs ({exc})") from exc
