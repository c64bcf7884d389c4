"""``imaging-assets serve``: a real server on a free loopback port; tokens, roles and signed picture links."""

from __future__ import annotations

import json
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

from imaging_assets.access import add_user
from imaging_assets.stages.thumbnails import picture_signature, picture_signature_ok, picture_url
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
    assert picture_file(wh, "thumbnails", "abc123.png") == (warehouse / "thumbnails" / "abc123.png").read_bytes()
    for folder, name in [("thumbnails", "../warehouse.duckdb"), ("..", "warehouse.duckdb"), ("lance", "x.png"),
                         ("thumbnails", "..png"), ("plots", "/etc/passwd.png"), ("thumbnails", "missing.png"),
                         ("thumbnails", "abc123.PNG.txt")]:
        assert picture_file(wh, folder, name) is None, (folder, name)


def test_picture_signatures_name_one_file(warehouse):
    wh = Warehouse(root=warehouse, lance_uri=str(warehouse / "lance"))
    sig = picture_signature(wh, "thumbnails", "abc123.png")
    assert picture_signature_ok(wh, "thumbnails", "abc123.png", sig)
    assert not picture_signature_ok(wh, "thumbnails", "other.png", sig)
    assert not picture_signature_ok(wh, "plots", "abc123.png", sig)
    assert not picture_signature_ok(wh, "thumbnails", "abc123.png", "")
    assert (warehouse / ".pictures_key").stat().st_mode & 0o777 == 0o600
    assert picture_url(wh, "http://h:1/pictures/", "thumbnails", "abc123.png") == (
        f"http://h:1/pictures/thumbnails/abc123.png?sig={sig}")


def _get(url: str, token: str | None = None) -> tuple[int, bytes, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


@pytest.fixture
def server(warehouse, tmp_path):
    users = tmp_path / "users.json"
    tokens = {role: add_user(f"{role}1", role, path=users) for role in ("viewer", "analyst")}
    port = _free_port()
    env = {**os.environ, "IMAGING_ASSETS_WAREHOUSE": str(warehouse), "IMAGING_ASSETS_USERS": str(users)}
    proc = subprocess.Popen([sys.executable, "-m", "imaging_assets.cli", "serve", "--port", str(port),
                             "--warehouse", str(warehouse)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while _get_quiet(f"{base}/healthz") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"serve did not start: {proc.stdout.read().decode(errors='replace')}")
        time.sleep(0.3)
    try:
        yield base, tokens, Warehouse(root=warehouse, lance_uri=str(warehouse / "lance"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def _get_quiet(url: str) -> int | None:
    try:
        return _get(url)[0]
    except (urllib.error.URLError, ConnectionError):
        return None


def test_serve_needs_a_token_or_a_signed_link(server):
    base, tokens, wh = server
    assert _get(f"{base}/pictures/thumbnails/abc123.png")[0] == 401
    assert _get(f"{base}/pictures/thumbnails/abc123.png", "ia_not-a-token")[0] == 401
    status, body, headers = _get(f"{base}/pictures/thumbnails/abc123.png", tokens["viewer"])
    assert status == 200 and body == PNG and headers["Content-Type"] == "image/png"
    signed = picture_url(wh, f"{base}/pictures", "plots", "cohort_x-0123abcd.png")
    status, body, headers = _get(signed)
    assert status == 200 and body == PNG and "immutable" in headers["Cache-Control"]
    # a signature opens its own picture only
    other = signed.replace("plots/cohort_x-0123abcd.png", "thumbnails/abc123.png")
    assert _get(other)[0] == 401
    for path in ["/pictures/thumbnails/..%2Fwarehouse.duckdb", "/pictures/lance/x.png", "/pictures/thumbnails/nope.png"]:
        assert _get(base + path, tokens["viewer"])[0] == 404, path
    assert _get(f"{base}/warehouse.duckdb", tokens["viewer"])[0] == 404
    # the page asks for a token; the API says what is missing
    status, body, _ = _get(f"{base}/")
    assert status == 401 and b"Access token" in body
    status, body, headers = _get(f"{base}/api/similar/abc", None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert "token" in json.loads(body)["error"]
