"""The run launcher of the local instance (``dagster.yaml``): Dagster's default launcher plus a run-worker
health check, so run monitoring can tell a dead run from a running one.

Dagster's :class:`~dagster.DefaultRunLauncher` cannot check a run worker's health, so when the run worker
dies together with its code server (``kill -9`` of the process group, an OOM kill of the container, a
reboot) nothing marks the run failed: it stays ``STARTED`` for ever, and the ``duckdb_writer`` pool slot its
step held stays taken, so every later run waits. With ``run_monitoring`` enabled, the daemon asks this
launcher about every ``STARTED`` run; a worker whose process is gone is reported ``FAILED``, the daemon marks
the run failed, and ``free_slots_after_run_end_seconds`` then frees the slots it held.

Same host only (the local instance of ``make dev``): the worker is found by the pid in its "Started process
for run" engine event, checked for being alive (not a zombie) and for having started before that event (so
a recycled pid does not pass for the worker). On Kubernetes or Docker use their launchers, whose health
checks Dagster provides.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

_STARTED = "Started process for run"


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def process_state(pid: int) -> tuple[bool, float | None]:
    """``(alive, start time as a Unix timestamp or None when unknown)``; a zombie counts as dead."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        text = stat.read_text()
    except FileNotFoundError:
        return False, None
    except OSError:  # no /proc (macOS): signal 0 says whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, None
        except PermissionError:
            return True, None
        return True, None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return False, None
    boot = _boot_time()
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") if boot is not None else None
    return True, started


class MonitoredRunLauncher(dg.DefaultRunLauncher):
    """:class:`~dagster.DefaultRunLauncher` whose run workers the run-monitoring daemon can health-check."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        worker = None
        for record in self._instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            event = record.dagster_event
            data = event.engine_event_data if event is not None else None
            pid = data.metadata.get("pid") if data is not None else None
            if pid is not None and (event.message or "").startswith(_STARTED):
                worker = (int(str(pid.value)), record.timestamp)
        if worker is None:  # no worker process recorded yet: the start timeout covers this case
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker pid recorded yet")
        pid, reported_at = worker
        alive, started = process_state(pid)
        if not alive:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone")
        if started is not None and started > reported_at + 5:
            return CheckRunHealthResult(WorkerStatus.FAILED,
                                        f"run worker process {pid} is gone (the pid now belongs to a newer process)")
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker process {pid} is alive")
