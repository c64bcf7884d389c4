"""End-to-end fixtures: a real ``dagster dev`` on a free loopback port, a headless Chromium, GraphQL helpers.

The server runs with a temporary ``DAGSTER_HOME`` (a copy of the repository's ``dagster.yaml``), a temporary
warehouse and the session's 6-patient demo cohort (``small_cohort``). It is started once per session in its
own process group and stopped (SIGINT, then SIGTERM, then SIGKILL to the whole group) at the end; its log is
kept in ``test-artifacts/e2e/dagster-dev.log`` and its tail printed when an e2e test failed.

Browser: Debian's ``chromium`` + ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``;
override with ``E2E_CHROMIUM`` / ``E2E_CHROMEDRIVER``). Selenium is given both paths, so Selenium Manager is
never run and nothing is downloaded. The browser test skips where they are absent; ``.ci/run`` installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "e2e"
LOCATION = "imaging_assets"
REPOSITORY = "__repository__"
#: The job of the whole chain (every asset but the cohorts, which are partitions of their own).
CHAIN_JOB = "refresh_job"
CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("E2E_CHROMEDRIVER", "/usr/bin/chromedriver")
STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 720

IN_PROGRESS = ("QUEUED", "NOT_STARTED", "MANAGED", "STARTING", "STARTED", "CANCELING")
DONE = ("SUCCESS", "FAILURE", "CANCELED")

_failed: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember failing e2e tests, so the server fixture knows to print its log on teardown."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "e2e" in Path(str(item.path)).parts:
        _failed.append(item.nodeid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DagsterDev:
    """A running ``dagster dev``: where it listens, what it reads and writes, and GraphQL helpers."""

    host: str
    port: int
    home: Path
    warehouse: Path
    log_path: Path
    proc: subprocess.Popen
    cohort: Any
    #: where ``imaging-assets serve`` publishes the pictures the asset pages link to
    pictures_url: str = ""
    #: id of a successful full materialization once one exists (set by the tests / ``materialized_run``)
    materialized_run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def database(self) -> Path:
        return self.warehouse / "warehouse.duckdb"

    def client(self):
        """The dagster-graphql client, as a scheduler or another service would use it."""
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(self.host, port_number=self.port)

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        """POST a raw GraphQL query; returns ``data`` (raises on transport or GraphQL errors)."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.base_url}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
        if doc.get("errors"):
            raise RuntimeError(f"GraphQL errors: {doc['errors']}")
        return doc["data"]

    def log_tail(self, n: int = 120) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # --- runs -------------------------------------------------------------------------------------------
    def runs(self, job_name: str | None = None, statuses: tuple[str, ...] | None = None) -> list[dict]:
        flt: dict[str, Any] = {}
        if job_name:
            flt["pipelineName"] = job_name
        if statuses:
            flt["statuses"] = list(statuses)
        data = self.graphql(
            """query Runs($filter: RunsFilter) { runsOrError(filter: $filter) {
                 __typename ... on Runs { results { runId jobName status creationTime } }
                 ... on PythonError { message } } }""", {"filter": flt})
        roe = data["runsOrError"]
        if roe["__typename"] != "Runs":
            raise RuntimeError(f"runsOrError: {roe}")
        return roe["results"]

    def run_status(self, run_id: str) -> str:
        return self.client().get_run_status(run_id).value

    def run_errors(self, run_id: str) -> str:
        """Failure / error events of a run, with their stack traces, as text."""
        data = self.graphql(
            """query Logs($runId: ID!) { logsForRun(runId: $runId, limit: 20000) {
                 __typename
                 ... on EventConnection { events { __typename
                     ... on MessageEvent { message level stepKey eventType }
                     ... on ErrorEvent { error { message stack cause { message stack } } } } }
                 ... on PythonError { message stack } } }""", {"runId": run_id}, timeout=60)
        logs = data["logsForRun"]
        if logs["__typename"] != "EventConnection":
            return json.dumps(logs, indent=1)
        out = []
        for ev in logs["events"]:
            if ev.get("level") in ("ERROR", "CRITICAL") or ev.get("error") or "Failure" in ev["__typename"]:
                out.append(f"[{ev['__typename']}] step={ev.get('stepKey')} {ev.get('message')}")
                err = ev.get("error")
                while err:
                    out.append("  " + (err.get("message") or "").rstrip())
                    out.append("".join(err.get("stack") or []).rstrip())
                    err = err.get("cause")
        return "\n".join(out) or "(no error events)"

    def wait_for_run(self, run_id: str, timeout: float = RUN_TIMEOUT_S, poll: float = 3.0) -> str:
        """Poll until the run is done; fail the test (with its error events) unless it succeeded."""
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status in DONE:
                break
            time.sleep(poll)
        else:
            pytest.fail(f"run {run_id} still {status} after {timeout:.0f}s\n--- dagster dev log ---\n"
                        f"{self.log_tail(60)}")
        if status != "SUCCESS":
            pytest.fail(f"run {run_id} ended {status}; error events:\n{self.run_errors(run_id)}")
        return status

    def wait_until_idle(self, timeout: float = RUN_TIMEOUT_S) -> None:
        """Wait until no run is queued or in progress (nobody holds the DuckDB write lock)."""
        deadline = time.monotonic() + timeout
        while self.runs(statuses=IN_PROGRESS):
            if time.monotonic() > deadline:
                pytest.fail(f"runs still in progress after {timeout:.0f}s: {self.runs(statuses=IN_PROGRESS)}")
            time.sleep(2)

    def read_warehouse(self, sql: str, params: list | None = None, attempts: int = 20) -> list[tuple]:
        """A short read-only query on the warehouse (retried while a writer holds DuckDB's lock)."""
        import duckdb

        for i in range(attempts):
            try:
                with duckdb.connect(str(self.database), read_only=True) as con:
                    return con.execute(sql, params or []).fetchall()
            except duckdb.IOException:
                if i == attempts - 1:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")


def _wait_until_loaded(server: DagsterDev) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/server_info", timeout=5) as resp:
                resp.read()
            data = server.graphql(
                """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
                     locationOrLoadError { __typename ... on PythonError { message stack } } } } } }""")
            entries = {e["name"]: e for e in data["workspaceOrError"].get("locationEntries", [])}
            entry = entries.get(LOCATION)
            last = json.dumps(entry)
            if entry and entry["loadStatus"] == "LOADED":
                err = entry["locationOrLoadError"] or {}
                if err.get("__typename") == "PythonError":
                    raise RuntimeError(f"code location {LOCATION} failed to load: {err['message']}\n"
                                       + "".join(err.get("stack") or []))
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = repr(exc)
        time.sleep(1)
    raise RuntimeError(f"dagster dev not ready after {STARTUP_TIMEOUT_S}s (last: {last}):\n{server.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl+C the whole process group (dagster dev shuts its children down), then TERM, then KILL."""
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                try:  # the leader is gone; are any of its children left in the group?
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.25)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``test-artifacts/e2e`` (git-ignored), emptied of the previous session's screenshots."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in list(ARTIFACTS.glob("*.png")) + list(ARTIFACTS.glob("*.html")):
        old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="session")
def dagster_dev(small_cohort, tmp_path_factory, artifacts_dir) -> Iterator[DagsterDev]:
    """``dagster dev -w workspace.yaml`` on a free loopback port over the demo cohort, loaded and answering."""
    dagster_bin = Path(sys.executable).parent / "dagster"
    if not dagster_bin.exists():
        found = shutil.which("dagster")
        if not found:
            pytest.fail("the dagster command is not installed next to the test interpreter nor on PATH")
        dagster_bin = Path(found)
    root = tmp_path_factory.mktemp("e2e")
    home, data, warehouse = root / "dagster_home", root / "data", root / "data" / "warehouse"
    for d in (home, data, warehouse):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IMAGING_ASSETS_", "DAGSTER_"))}
    env.update({
        "DAGSTER_HOME": str(home),
        "IMAGING_ASSETS_DATA": str(data),
        "IMAGING_ASSETS_DICOM_ROOTS": str(small_cohort.dicom_dir),
        "IMAGING_ASSETS_OUTCOMES": str(small_cohort.outcomes_csv),
        "IMAGING_ASSETS_WAREHOUSE": str(warehouse),
        "IMAGING_ASSETS_PSEUDONYM_KEY": "test",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
    })
    # the pictures server beside the UI, as `make dev` runs it: asset pages link their plots to it
    pictures_port = _free_port()
    env["IMAGING_ASSETS_PICTURES_URL"] = f"http://127.0.0.1:{pictures_port}/pictures"
    serve_log = open(root / "serve.log", "wb")  # noqa: SIM115 - closed on teardown
    serve = subprocess.Popen(
        [sys.executable, "-m", "imaging_assets.cli", "serve", "--port", str(pictures_port), "--warehouse",
         str(warehouse)], cwd=REPO_ROOT, env=env, stdout=serve_log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    port = _free_port()
    log_path = root / "dagster-dev.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed on teardown
    proc = subprocess.Popen(
        [str(dagster_bin), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    server = DagsterDev(host="127.0.0.1", port=port, home=home, warehouse=warehouse, log_path=log_path,
                        proc=proc, cohort=small_cohort, pictures_url=env["IMAGING_ASSETS_PICTURES_URL"])
    try:
        t0 = time.monotonic()
        _wait_until_loaded(server)
        server.notes.append(f"dagster dev ready in {time.monotonic() - t0:.0f}s on port {port}")
        yield server
    finally:
        _stop(proc)
        _stop(serve)
        serve_log.close()
        log.close()
        shutil.copy(log_path, artifacts_dir / "dagster-dev.log")
        if _failed:
            sys.stderr.write(f"\n--- dagster dev log tail (full log: {artifacts_dir / 'dagster-dev.log'}) ---\n"
                             f"{server.log_tail(150)}\n")


@pytest.fixture(scope="session")
def materialized_run(dagster_dev: DagsterDev) -> str:
    """Id of a successful run of the whole chain (``refresh_job``): the browser test's run when it made one, a run in
    progress when there is one, else one launched here through GraphQL (so the tests stay independent)."""
    server = dagster_dev
    if server.materialized_run_id:
        return server.materialized_run_id
    for run in server.runs(job_name=CHAIN_JOB):
        if run["status"] == "SUCCESS":
            server.materialized_run_id = run["runId"]
            return run["runId"]
    in_progress = server.runs(job_name=CHAIN_JOB, statuses=IN_PROGRESS)
    if in_progress:
        run_id = in_progress[0]["runId"]
    else:
        run_id = server.client().submit_job_execution(
            CHAIN_JOB, repository_location_name=LOCATION, repository_name=REPOSITORY)
    server.wait_for_run(run_id)
    server.materialized_run_id = run_id
    return run_id


CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1600,1000")


@pytest.fixture
def browser(tmp_path_factory) -> Iterator[Any]:
    """Headless Debian Chromium driven by Selenium (skips where chromium / chromedriver are missing)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        pytest.skip(f"browser test needs {' and '.join(missing)} (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path_factory.getbasetemp())
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors go with a failure's artefacts
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
