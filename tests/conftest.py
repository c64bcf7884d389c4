"""Shared fixtures: real data location, a small demo cohort generated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()

# There is no built-in pseudonym key: the suite sets an explicit test key once for the session.
os.environ.setdefault("IMAGING_ASSETS_PSEUDONYM_KEY", "test-suite-key")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CT/MR/PET with SEG and RTSTRUCT); skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it is optional outside this workplace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory):
    """A 6-patient demo cohort (seed 11) generated once per test session."""
    from imaging_assets.demo.generator import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "demo"
    return generate_cohort(out, n_patients=6, seed=11, workers=2)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, in a process of its own) on loopback with a free port, for the session;
    stopped afterwards. ``s3_server.bucket(name)`` creates a bucket and returns ``s3://name``."""
    from imaging_assets.locals3 import local_s3

    with local_s3() as s3:
        yield s3
