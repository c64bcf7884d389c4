"""Version retention of a Lance table: which old versions are removed, and which are never.

Every write of the vector table (``merge_insert``, deletes, ``optimize``'s compaction and index update) makes
a version; without a policy a 223-row table grew to 1,455 versions and 189 MB after ~560 upserts. Lance's own
age-based cleanup (``optimize(cleanup_older_than=...)``, ``cleanup_old_versions(older_than=...)``) is the wrong
tool on its own: it removes a version an audit row or a cohort names (their answers can then no longer be
replayed) as soon as it is old enough, and too short an age removes versions that readers and concurrent
writers still use (the ``cleanup_older_than`` pitfall: lancedb/lancedb#2470, a zero age breaks concurrent
writes).

The policy (:func:`apply_retention`) removes exactly the versions that are

* not the latest version,
* not pinned (the caller passes the versions named by audit rows, cohorts and robust-set records),
* older than ``keep`` (the last N days stay for time travel), and
* older than :data:`MIN_VERSION_AGE` whatever ``keep`` says (a reader that opened a version when it was the
  latest finishes long before that: searches take milliseconds, SQL stops at its statement timeout),

with Lance's exact-version cleanup (``cleanup_old_versions(versions=[...])``), which keeps the files a
remaining version still uses and never removes the latest version. Storage only: no domain imports.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from imaging_assets.store.lance.connection import open_dataset
from imaging_assets.store.lance.schema import VECTOR_TABLE

logger = logging.getLogger(__name__)

#: No version younger than this is removed, whatever the policy's ``keep`` (readers and writers in flight).
MIN_VERSION_AGE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class RetentionReport:
    """What one :func:`apply_retention` did (the vectors asset shows it as metadata)."""

    versions_before: int
    versions_after: int
    removed: int
    kept_pinned: int
    kept_recent: int
    latest: int
    bytes_removed: int
    keep_days: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _age(timestamp: dt.datetime, now: dt.datetime) -> dt.timedelta:
    if timestamp.tzinfo is None:  # Lance reports naive local time
        timestamp = timestamp.astimezone()
    return now - timestamp


def removable_versions(versions: Iterable[dict[str, Any]], latest: int, pinned: Iterable[int],
                       keep: dt.timedelta, now: dt.datetime | None = None) -> tuple[list[int], int, int]:
    """``(versions to remove, pinned versions kept, recent versions kept)`` under the policy of this module.

    ``versions`` as ``LanceDataset.versions()`` lists them (``version``, ``timestamp``).
    """
    now = now or dt.datetime.now(dt.UTC)
    horizon = max(keep, MIN_VERSION_AGE)
    pins = {int(v) for v in pinned if v is not None}
    remove, kept_pinned, kept_recent = [], 0, 0
    for v in versions:
        number = int(v["version"])
        if number == latest:
            continue
        if number in pins:
            kept_pinned += 1
        elif _age(v["timestamp"], now) <= horizon:
            kept_recent += 1
        else:
            remove.append(number)
    return sorted(remove), kept_pinned, kept_recent


def apply_retention(uri: str | os.PathLike[str], pinned: Iterable[int], keep: dt.timedelta,
                    table_name: str = VECTOR_TABLE) -> RetentionReport | None:
    """Remove the table's versions that the policy lets go (see the module docstring); None without a table.

    Parameters
    ----------
    uri, table_name
        The table.
    pinned
        Versions that must stay (named by audit rows, cohorts, ...).
    keep
        Versions younger than this stay (never less than :data:`MIN_VERSION_AGE`).
    """
    try:
        ds = open_dataset(uri, table_name)
    except (FileNotFoundError, ValueError):
        return None
    listed = ds.versions()
    latest = int(ds.latest_version)
    remove, kept_pinned, kept_recent = removable_versions(listed, latest, pinned, keep)
    removed_bytes = 0
    if remove:
        # older_than repeats the age floor inside Lance (its own clock): a version younger than it stays
        stats = ds.cleanup_old_versions(older_than=MIN_VERSION_AGE, versions=remove, error_if_tagged_old_versions=False)
        removed_bytes = int(stats.bytes_removed)
    after = len(open_dataset(uri, table_name).versions())
    report = RetentionReport(versions_before=len(listed), versions_after=after, removed=len(listed) - after,
                             kept_pinned=kept_pinned, kept_recent=kept_recent, latest=latest,
                             bytes_removed=removed_bytes, keep_days=round(max(keep, MIN_VERSION_AGE).total_seconds()
                                                                          / 86400, 4))
    logger.info("%s: retention removed %d of %d versions (%d bytes); kept %d pinned, %d recent, latest %d",
                table_name, report.removed, report.versions_before, removed_bytes, kept_pinned, kept_recent, latest)
    return report
