"""A real S3-compatible server on loopback, for the tests, the benchmarks and trying object storage locally.

It is moto's server (``python -m moto.server``, a dev dependency: ``make install`` installs it) in a
process of its own (its own process group), listening on ``127.0.0.1`` on a free port: a real HTTP server
speaking the S3 protocol, with conditional writes (``If-None-Match: *``) enforced, which Lance and delta-rs
rely on for safe commits. Not moto's in-process ``ThreadedMotoServer``: some delta-rs calls
(``history``, ``alter``) hold Python's GIL while they wait for the network, so a server thread in the same
process could never answer them. Everything it stores lives in memory and is gone when it stops.

Usage::

    with local_s3() as s3:            # s3.options: endpoint + credentials; s3.bucket(name) creates one
        uri = s3.bucket("warehouse")   # "s3://warehouse"
        ...

or ``python -m imaging_assets.locals3`` to keep one running and print the environment to use.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imaging_assets.store.objects import S3Options

#: Credentials the local server accepts (moto accepts any; these are what the tests and benchmarks send).
ACCESS_KEY = "imaging-assets-test"
SECRET_KEY = "imaging-assets-test-secret"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalS3:
    """A running server: its endpoint, the options to reach it, and bucket creation."""

    endpoint_url: str
    process: Any

    @property
    def options(self) -> S3Options:
        """Endpoint, region and credentials of this server."""
        return S3Options(endpoint_url=self.endpoint_url, region=REGION, access_key_id=ACCESS_KEY,
                         secret_access_key=SECRET_KEY)

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def bucket(self, name: str) -> str:
        """Create a bucket (idempotent) and return its URI ``s3://name``."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        """Stop the server (its content is lost)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@contextmanager
def local_s3(port: int | None = None) -> Iterator[LocalS3]:
    """Start a local S3 server for the duration of the block.

    Raises
    ------
    RuntimeError
        When moto (a dev dependency) is not installed, or the server does not answer within 10 s.
    """
    try:
        import moto.server  # noqa: F401 - only to fail early with a clear message
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise RuntimeError("the local S3 server needs moto[server] (installed by `make install`)") from exc
    port = port or _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    s3 = LocalS3(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the local S3 server on port {port} exited with {proc.returncode}")
            try:
                s3.client().list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local S3 server on {s3.endpoint_url} did not start in 30 s") from None
                time.sleep(0.2)
        yield s3
    finally:
        s3.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a local S3 server in the foreground with a bucket, printing the environment to use."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bucket", default="imaging-assets")
    args = p.parse_args(argv)
    with local_s3(args.port or None) as s3:
        uri = s3.bucket(args.bucket)
        for key, value in {**s3.env(), "IMAGING_ASSETS_WAREHOUSE": f"{uri}/warehouse"}.items():
            print(f"export {key}={value}")
        print("# Ctrl-C stops the server (its content is in memory and is lost)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
