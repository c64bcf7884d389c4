"""The pseudonymisation key fingerprints of a warehouse, and the columns that hold patient keys (storage only).

The warehouse never holds a key, only fingerprints (table ``pseudonym_keys``): the current one has
``retired_at`` NULL. :mod:`imaging_assets.stages.keys` decides what to do with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from imaging_assets.store.schema import ensure_schema

TABLE = "pseudonym_keys"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def current_fingerprint(con: duckdb.DuckDBPyConnection) -> str | None:
    """The fingerprint of the key the warehouse's patient keys were made with; None when none is recorded."""
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' "
                         "AND table_name = ?", [TABLE]).fetchall()[0][0]
    if not exists:
        return None
    rows = con.execute(f"SELECT fingerprint FROM {TABLE} WHERE retired_at IS NULL "
                       "ORDER BY recorded_at DESC LIMIT 1").fetchall()
    return rows[0][0] if rows else None


def record_fingerprint(con: duckdb.DuckDBPyConnection, fingerprint: str, patients: int | None = None) -> None:
    """Make ``fingerprint`` the current key's (the previous current one, if any, is retired now)."""
    ensure_schema(con)
    now = _now()
    con.execute(f"UPDATE {TABLE} SET retired_at = ? WHERE retired_at IS NULL AND fingerprint <> ?",
                [now, fingerprint])
    con.execute(f"DELETE FROM {TABLE} WHERE fingerprint = ?", [fingerprint])  # a key used again: current
    con.execute(f"INSERT INTO {TABLE} VALUES (?, ?, NULL, ?)", [fingerprint, now, patients])


def patient_key_columns(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    """``(schema, table, column)`` of every base-table column holding patient keys (``patient_key`` or
    ``*_patient_key``), whatever stage or cohort made the table."""
    return [tuple(r) for r in con.execute(
        "SELECT c.table_schema, c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_catalog, table_schema, table_name) "
        "WHERE t.table_type = 'BASE TABLE' AND (c.column_name = 'patient_key' OR c.column_name LIKE "
        "'%\\_patient\\_key' ESCAPE '\\') AND c.data_type = 'VARCHAR' ORDER BY 1, 2, 3").fetchall()]


def stored_patient_keys(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str, str], set[str]]:
    """Distinct non-NULL patient keys per column of :func:`patient_key_columns`."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for schema, table, column in patient_key_columns(con):
        # identifiers from information_schema itself, quoted: no value reaches the SQL text
        keys = con.execute(f'SELECT DISTINCT "{column}" FROM "{schema}"."{table}" '
                           f'WHERE "{column}" IS NOT NULL').fetchall()
        out[(schema, table, column)] = {k for (k,) in keys}
    return out


def any_patient_keys(con: duckdb.DuckDBPyConnection) -> bool:
    """True when some table holds a patient key."""
    for schema, table, column in patient_key_columns(con):
        if con.execute(f'SELECT 1 FROM "{schema}"."{table}" WHERE "{column}" IS NOT NULL LIMIT 1').fetchall():
            return True
    return False


def _key_columns(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str, str]]:
    """``(schema, table, column)`` of the columns in a primary key (they cannot be NULL)."""
    out = set()
    for schema, table, cols in con.execute(
            "SELECT schema_name, table_name, constraint_column_names FROM duckdb_constraints() "
            "WHERE constraint_type = 'PRIMARY KEY'").fetchall():
        out.update((schema, table, c) for c in cols)
    return out


def replace_patient_keys(con: duckdb.DuckDBPyConnection, mapping: Mapping[str, str | None]) -> dict[str, int]:
    """Replace every stored patient key by ``mapping[old]`` in every column of :func:`patient_key_columns`
    (inside the caller's transaction); keys not in ``mapping`` are left alone. A key mapped to None is set
    to NULL, or its rows deleted where the column is part of the table's primary key. Returns the rows
    changed per ``schema.table.column``."""
    con.register("_rekey_map", pa.table({"old": pa.array(list(mapping), pa.string()),
                                         "new": pa.array(list(mapping.values()), pa.string())}))
    changed: dict[str, int] = {}
    keyed = _key_columns(con)
    try:
        for schema, table, column in patient_key_columns(con):
            # identifiers from information_schema itself, quoted: no value reaches the SQL text
            n = 0
            if (schema, table, column) in keyed:
                n += con.execute(f'DELETE FROM "{schema}"."{table}" WHERE "{column}" IN '
                                 "(SELECT old FROM _rekey_map WHERE new IS NULL)").fetchall()[0][0]
            n += con.execute(f'UPDATE "{schema}"."{table}" AS t SET "{column}" = m.new FROM _rekey_map m '
                             f'WHERE t."{column}" = m.old').fetchall()[0][0]
            changed[f"{schema}.{table}.{column}"] = int(n)
    finally:
        try:
            con.unregister("_rekey_map")
        except duckdb.Error:  # the transaction failed: the caller rolls back and sees the first error
            pass
    return changed
