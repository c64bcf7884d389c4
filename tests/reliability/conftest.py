"""Fixtures of the reliability suite: one clean, fully materialized demo warehouse per session.

The helpers live in ``reliability_helpers.py`` and the subprocess driver in ``reliability_driver.py`` (both in
this folder, which is put on ``sys.path`` here so the import works under every pytest import mode).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import reliability_helpers as rh  # noqa: E402

DRIVER = HERE / "reliability_driver.py"


@pytest.fixture(scope="session")
def clean_chain(small_cohort, tmp_path_factory):
    """The whole chain materialized once on the 6-patient demo cohort (in this process, 2 workers).

    Returns a dict: ``wh`` (the folder), ``warehouse`` (its Warehouse), ``db``, ``lance``, ``cohort``,
    ``summary`` (the step results), and the
    fingerprints taken right after the run (``duckdb_hashes``, ``lance_hashes``), before any test adds audit
    rows or cohort tables.
    """
    from imaging_assets.store.warehouse import Warehouse

    wh = tmp_path_factory.mktemp("clean_wh")
    summary = rh.run_chain(wh, small_cohort.dicom_dir, small_cohort.outcomes_csv, workers=2)
    warehouse = Warehouse(wh)
    db = warehouse.duckdb_path
    return {
        "wh": wh, "warehouse": warehouse, "db": db, "lance": warehouse.lance_uri, "cohort": small_cohort,
        "summary": summary,
        "duckdb_hashes": rh.duckdb_table_hashes(db), "lance_hashes": rh.lance_table_hashes(wh / "lance"),
    }


@pytest.fixture()
def chain_copy(clean_chain, tmp_path):
    """A private copy of the clean warehouse (DuckDB file + Lance folder) that a test may change."""
    from imaging_assets.store.warehouse import Warehouse

    wh = tmp_path / "wh"
    shutil.copytree(clean_chain["wh"], wh)
    warehouse = Warehouse(wh)
    return {**clean_chain, "wh": wh, "warehouse": warehouse, "db": warehouse.duckdb_path,
            "lance": warehouse.lance_uri}


@pytest.fixture()
def driver_env():
    """Environment for driver subprocesses: the suite's pseudonym key, quiet and unbuffered."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("IMAGING_ASSETS_PSEUDONYM_KEY", "test-suite-key")
    return env
