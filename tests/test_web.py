"""``imaging-assets serve``: a real server on a free loopback port publishes the pictures and nothing else."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from imaging_assets.store.warehouse import Warehouse
from imaging_assets.web import picture_file

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
       b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def warehouse(tmp_path) -> Path:
    root = tmp_path / "wh"
    (root / "thumbnails").mkdir(parents=True)
    (root / "plots").mkdir()
    (root / "thumbnails" / "abc123.png").write_bytes(PNG)
    (root / "plots" / "cohort_x-0123abcd.png").write_bytes(PNG)
    (root / "warehouse.duckdb").write_bytes(b"secret tables")
    return root


def test_picture_file_stays_in_its_folders(warehouse):
    wh = Warehouse(root=warehouse, lance_uri=str(warehouse / "lance"))
    assert picture_file(wh, "thumbnails", "abc123.png") == warehouse / "thumbnails" / "abc123.png"
    for folder, name in [("thumbnails", "../warehouse.duckdb"), ("..", "warehouse.duckdb"), ("lance", "x.png"),
                         ("thumbnails", "..png"), ("plots", "/etc/passwd.png"), ("thumbnails", "missing.png"),
                         ("thumbnails", "abc123.PNG.txt")]:
        assert picture_file(wh, folder, name) is None, (folder, name)


def test_serve_publishes_pictures_only(warehouse):
    port = _free_port()
    env = {**os.environ, "IMAGING_ASSETS_WAREHOUSE": str(warehouse)}
    proc = subprocess.Popen([sys.executable, "-m", "imaging_assets.cli", "serve", "--port", str(port),
                             "--warehouse", str(warehouse)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve did not start: {proc.stdout.read().decode(errors='replace')}") from None
                time.sleep(0.3)
        with urllib.request.urlopen(f"{base}/pictures/thumbnails/abc123.png", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/png" and r.read() == PNG
        with urllib.request.urlopen(f"{base}/pictures/plots/cohort_x-0123abcd.png", timeout=5) as r:
            assert "immutable" in r.headers["Cache-Control"]
        for path in ["/pictures/thumbnails/..%2Fwarehouse.duckdb", "/pictures/../warehouse.duckdb",
                     "/pictures/lance/x.png", "/warehouse.duckdb", "/pictures/thumbnails/nope.png"]:
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=5)
            assert err.value.code == 404, path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
