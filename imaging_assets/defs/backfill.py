"""Backfill the partitioned extraction from the command line and wait for it (``imaging-assets backfill``).

Dagster's own ``dagster job backfill`` submits one run per batch of series to the instance of
``DAGSTER_HOME`` (its run coordinator queues them; the daemon launches them, on Celery workers for
``extraction_celery_job``). This module tags the runs, follows them in the instance's run storage until
every partition's run ended, and submits the partitions whose run failed again (``retries``): Dagster's
run retries skip the runs of a command-line backfill (it is complete once its runs are submitted), while a
backfill launched from the UI is retried by the instance (``run_retries`` in dagster-postgres.yaml).
No definitions here.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"
BACKFILL_TAG = "imaging_assets/backfill"
_DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class BackfillReport:
    """The runs of one backfill: per partition its latest run's id and status, and the seconds waited."""

    tag: str
    runs: dict[str, tuple[str, str]]
    attempts: int
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Every partition's latest run succeeded."""
        return bool(self.runs) and all(status == "SUCCESS" for _, status in self.runs.values())


def submit_backfill(job: str, partitions: list[str]) -> str:
    """Submit ``dagster job backfill`` for ``partitions`` of ``job``; returns the tag its runs carry."""
    if not partitions:
        raise ValueError("no partitions to backfill")
    tag = uuid.uuid4().hex[:12]
    cmd = [str(Path(sys.executable).with_name("dagster")), "job", "backfill", "-w", str(WORKSPACE), "-j", job,
           "--noprompt", "--tags", f'{{"{BACKFILL_TAG}": "{tag}"}}', "--partitions", ",".join(partitions)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"dagster job backfill failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return tag


def wait_for_backfill(tag: str, expected: int, timeout_s: float = 3600.0, retry_grace_s: float = 0.0,
                      instance: dg.DagsterInstance | None = None) -> BackfillReport:
    """Follow the runs tagged ``tag`` until each of the ``expected`` partitions has a finished latest run
    and, for a failed one, no retry came within ``retry_grace_s``."""
    instance = instance or dg.DagsterInstance.get()
    t0 = time.monotonic()
    failed_since: float | None = None
    while True:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: tag}))
        latest: dict[str, dg.DagsterRun] = {}
        for run in sorted(runs, key=lambda r: int(r.tags.get("dagster/retry_number", "0"))):
            latest[run.tags.get("dagster/partition", run.run_id)] = run
        finished = len(latest) >= expected and all(r.status in _DONE for r in latest.values())
        any_failed = any(r.status != dg.DagsterRunStatus.SUCCESS for r in latest.values())
        if finished and any_failed:
            failed_since = failed_since or time.monotonic()
        else:
            failed_since = None
        waited = time.monotonic() - t0
        if (finished and not any_failed) or (failed_since and time.monotonic() - failed_since > retry_grace_s) \
                or waited > timeout_s:
            return BackfillReport(tag, {p: (r.run_id, r.status.value) for p, r in sorted(latest.items())},
                                  len(runs), round(waited, 1))
        time.sleep(1.0)


def run_backfill(job: str, partitions: list[str], retries: int = 2, timeout_s: float = 3600.0,
                 instance: dg.DagsterInstance | None = None) -> BackfillReport:
    """Backfill ``partitions`` of ``job``, wait, and submit the failed partitions again, up to ``retries``
    times. A batch's result files are committed atomically, so a retried batch replaces exactly its files."""
    t0 = time.monotonic()
    runs: dict[str, tuple[str, str]] = {}
    attempts, tags = 0, []
    todo = list(partitions)
    for _ in range(retries + 1):
        tag = submit_backfill(job, todo)
        tags.append(tag)
        report = wait_for_backfill(tag, len(todo), timeout_s=max(1.0, timeout_s - (time.monotonic() - t0)),
                                   instance=instance)
        attempts += report.attempts
        runs.update(report.runs)
        todo = [p for p, (_, status) in report.runs.items() if status != "SUCCESS"]
        todo += [p for p in partitions if p not in runs]
        if not todo or time.monotonic() - t0 > timeout_s:
            break
    return BackfillReport(",".join(tags), dict(sorted(runs.items())), attempts, round(time.monotonic() - t0, 1))
