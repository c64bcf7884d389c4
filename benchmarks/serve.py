"""Latency of ``GET /api/similar/{lesion_id}`` on a running ``imaging-assets serve``, beside the same answer
in process and the CLI, on one warehouse (default: the demo's, ``make demo``).

Usage::

    .venv/bin/python benchmarks/serve.py [--warehouse data/warehouse] [--requests 400] [--k 10]

Starts the real server (``python -m imaging_assets.cli serve`` on a free loopback port, a temporary users
file with one viewer), then:

* **HTTP**: ``--requests`` sequential requests over one keep-alive connection, k=10, explanations included,
  every one audited (the server's audit journal), cycling over the lesions of the vector table, half of them
  with a modality filter; p50 / p90 / p99 / max after a warm-up;
* **in process**: :func:`imaging_assets.web.similar_answer` with a warm
  :class:`~imaging_assets.stages.serving.WarmSearch` (what the server runs, without HTTP and JSON), and
  cold (opening the files for every answer, as before the server kept them);
* **CLI**: ``imaging-assets similar <id> --explain`` wall time (median of 5), through the running server
  (``IMAGING_ASSETS_SERVER_URL`` + ``IMAGING_ASSETS_TOKEN``) and opening the files itself.

It then stops the server and checks that every request left its audit row (user ``bench``) in
``audit_log``. PASS/FAIL: HTTP p50 <= 20 ms and p99 <= 60 ms; all requests audited; the CLI through the
server <= 0.6 s. The 1M-vector search
figures are ``benchmarks/memory_index.py``'s; the CLI's target is ``benchmarks/cli_similar.py``'s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

P50_MS, P99_MS = 20.0, 60.0
CLI_S = 0.6


def _cli(env: dict[str, str], lesion: str, wh) -> list[float]:
    """Wall times of ``imaging-assets similar <id> --explain`` (5, after one warm-up)."""
    times = []
    for _ in range(6):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "imaging_assets.cli", "similar", lesion, "--explain",
                              "--warehouse", str(wh.root)], env=env, cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if out.returncode:
            sys.exit(f"imaging-assets similar failed: {out.stderr[-1000:]}")
    return times[1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(times: list[float], q: float) -> float:
    s = sorted(times)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000


def _line(label: str, times: list[float]) -> str:
    return (f"  {label:48s}" + "".join(f"{_pct(times, q):8.1f}" for q in (0.5, 0.9, 0.99)) +
            f"{max(times) * 1000:8.1f}  ms  (n={len(times)})")


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"]
                                                              if os.environ.get("PYTHONPATH") else "")}


def _audit_count(wh, user: str) -> int:
    with wh.connect(read_only=True) as con:
        return con.execute("SELECT count(*) FROM audit_log WHERE \"user\" = ?", [user]).fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    from imaging_assets import settings
    from imaging_assets.access import add_user
    from imaging_assets.stages.serving import WarmSearch
    from imaging_assets.store.lance import lance_dataset
    from imaging_assets.store.warehouse import Warehouse
    from imaging_assets.web import similar_answer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder (default: the demo's)")
    p.add_argument("--requests", type=int, default=400, help="measured HTTP requests (default 400)")
    p.add_argument("--k", type=int, default=10, help="neighbours per answer (default 10)")
    args = p.parse_args(argv)
    src = Path(args.warehouse)
    if not (src / "warehouse.duckdb").exists():
        sys.exit(f"no warehouse at {src}: run `make demo` first (or pass --warehouse)")
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        # a copy: the benchmark's audit rows do not land in the user's warehouse
        shutil.copytree(src, tmp / "wh", ignore=shutil.ignore_patterns("*.audit-journal*"))
        wh = Warehouse(tmp / "wh")
        meta = lance_dataset(wh.lance_uri).to_table(columns=["lesion_id", "modality"]).to_pylist()
        if not meta:
            sys.exit(f"the vector table of {src} is empty")
        lesions = sorted((r["lesion_id"], r["modality"]) for r in meta)
        users = tmp / "users.json"
        token = add_user("bench", "viewer", path=users)
        port = _free_port()
        before = _audit_count(wh, "bench")
        env = _env({"IMAGING_ASSETS_WAREHOUSE": str(wh.root), "IMAGING_ASSETS_USERS": str(users)})
        print(f"warehouse {src} (a copy), {len(lesions)} lesions with vectors, k={args.k}; server on port {port}")
        print(f"  {'':48s}{'p50':>8s}{'p90':>8s}{'p99':>8s}{'max':>8s}")
        server = subprocess.Popen([sys.executable, "-m", "imaging_assets.cli", "serve", "--port", str(port),
                                   "--warehouse", str(wh.root)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=(tmp / "serve.log").open("wb"), start_new_session=True)
        try:
            t0 = time.perf_counter()
            conn = None
            while time.perf_counter() - t0 < 120:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("GET", "/healthz")
                    if conn.getresponse().read():
                        break
                except OSError:
                    conn = None
                    time.sleep(0.2)
            if conn is None:
                sys.exit(f"the server did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
            print(f"  server up in {time.perf_counter() - t0:.1f} s")
            headers = {"Authorization": f"Bearer {token}"}

            def get(i: int) -> dict:
                lid, modality = lesions[i % len(lesions)]
                path = f"/api/similar/{lid}?k={args.k}" + (f"&modality={modality}" if i % 2 and modality else "")
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise SystemExit(f"GET {path}: {resp.status} {body[:300]!r}")
                return json.loads(body)

            warmup = min(40, len(lesions))
            for i in range(warmup):
                answer = get(i)
            if not answer["results"] or "explanation" not in answer["results"][0]:
                sys.exit(f"answers lack results or explanations: {str(answer)[:300]}")
            times = []
            for i in range(args.requests):
                t = time.perf_counter()
                get(warmup + i)
                times.append(time.perf_counter() - t)
            print(_line("HTTP GET /api/similar (explanations, audit)", times))
            via = _cli(env | {"IMAGING_ASSETS_SERVER_URL": f"http://127.0.0.1:{port}", "IMAGING_ASSETS_TOKEN": token},
                       lesions[0][0], wh)
            print(f"  {'CLI through the server (similar <id> --explain)':48s}{statistics.median(via) * 1000:8.0f}  ms "
                  "median of 5 (after one warm-up)")
            expected_cli = 6
        finally:
            server.send_signal(signal.SIGINT)  # a clean stop flushes the audit journal
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        audited = _audit_count(wh, "bench") - before
        expected = warmup + args.requests + expected_cli

        warm = WarmSearch(wh).start()
        try:
            inproc = []
            for i in range(args.requests):
                lid, modality = lesions[i % len(lesions)]
                t = time.perf_counter()
                similar_answer(wh, lid, args.k, {"modality": [modality]} if i % 2 and modality else {}, "bench-inproc",
                               "http://x/pictures", warm=warm)
                inproc.append(time.perf_counter() - t)
        finally:
            warm.stop()
        print(_line("in process, warm (WarmSearch)", inproc))
        cold = []
        for i in range(min(40, args.requests)):
            lid, _ = lesions[i % len(lesions)]
            t = time.perf_counter()
            similar_answer(wh, lid, args.k, {}, "bench-cold", "http://x/pictures")
            cold.append(time.perf_counter() - t)
        print(_line("in process, cold (files opened per answer)", cold))
        cli = _cli(env, lesions[0][0], wh)
        print(f"  {'CLI opening the files (similar <id> --explain)':48s}{statistics.median(cli) * 1000:8.0f}  ms median "
              "of 5 (after one warm-up)")
        ok_p50, ok_p99, ok_audit = _pct(times, 0.5) <= P50_MS, _pct(times, 0.99) <= P99_MS, audited == expected
        ok_cli = statistics.median(via) <= CLI_S
        print(f"HTTP p50 {_pct(times, 0.5):.1f} ms (target <= {P50_MS:g}): {'PASS' if ok_p50 else 'FAIL'}")
        print(f"HTTP p99 {_pct(times, 0.99):.1f} ms (target <= {P99_MS:g}): {'PASS' if ok_p99 else 'FAIL'}")
        print(f"audit rows of the server's user: {audited} of {expected} requests: {'PASS' if ok_audit else 'FAIL'}")
        print(f"CLI similar through the server {statistics.median(via):.3f} s (target <= {CLI_S:g} s): "
              f"{'PASS' if ok_cli else 'FAIL'}; opening the files itself {statistics.median(cli):.3f} s "
              f"({'PASS' if statistics.median(cli) <= CLI_S else 'FAIL'}: the imports of pyarrow/lance/pandas)")
        return 0 if ok_p50 and ok_p99 and ok_audit and ok_cli else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
