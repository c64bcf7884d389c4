"""Resources shared by every stage: where the warehouse is and which folders hold the DICOM archive."""

import os

import dagster as dg
from pydantic import Field

from imaging_assets import settings
from imaging_assets.store.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse folder: ``warehouse.duckdb`` (SQL face, catalog tables) and the Lance tables.

    Connections are opened briefly inside ``with`` blocks, as dagster-duckdb's ``DuckDBResource`` does;
    a writer waits (with backoff) while another process holds DuckDB's single write lock.
    """

    root: str = Field(
        default_factory=lambda: str(settings.warehouse_dir()),
        description="Warehouse folder (env IMAGING_ASSETS_WAREHOUSE; default data/warehouse).",
    )

    lance: str = Field(
        default="",
        description="LanceDB URI for the vector tables: a folder or an object-store URI (s3://...); "
        "empty = env IMAGING_ASSETS_LANCE_URI, else <root>/lance.",
    )

    def get_warehouse(self) -> Warehouse:
        """The :class:`~imaging_assets.store.warehouse.Warehouse` every stage step takes."""
        return Warehouse.from_settings(root=self.root, lance_uri=self.lance or None)


class DicomSourcesResource(dg.ConfigurableResource):
    """What discovery reads: DICOM root folders and optional NIfTI/NRRD manifests.

    The pseudonymisation secret is deliberately *not* a field (nor of any resource): a config field's value
    is written into Dagster's run storage and shown in the UI. It is read from the environment
    (``IMAGING_ASSETS_PSEUDONYM_KEY``, see :func:`pseudonym_secret`) or the installation's key file.
    """

    roots: list[str] = Field(
        default_factory=settings.dicom_roots,
        description="Folders to crawl (env IMAGING_ASSETS_DICOM_ROOTS, os.pathsep-separated; "
        "default data/demo/dicom).",
    )
    manifests: list[str] = Field(
        default_factory=settings.manifests,
        description="CSV manifests of NIfTI/NRRD image+mask pairs (env IMAGING_ASSETS_MANIFESTS).",
    )
    workers: int = Field(default=0, description="Header-reading processes; 0 = one per CPU core.")

    def worker_count(self) -> int:
        """Process count to use."""
        return self.workers or (os.cpu_count() or 1)


class OutcomeSourcesResource(dg.ConfigurableResource):
    """Where clinical outcome files (CSV / Parquet) are dropped."""

    path: str = Field(
        default_factory=lambda: str(_default_outcomes()),
        description="A file or a folder of outcome files (env IMAGING_ASSETS_OUTCOMES; default the demo's "
        "outcomes.csv).",
    )


def pseudonym_secret() -> str | None:
    """The pseudonymisation secret from the environment, through ``dg.EnvVar`` (read when a step runs, never
    part of run config); None when unset, and the stages then use the installation's key file."""
    from imaging_assets.dicom.pseudonym import ENV_VAR

    return dg.EnvVar(ENV_VAR).get_value() or None


def _default_outcomes():
    return settings.outcomes_source()


@dg.definitions
def resources() -> dg.Definitions:
    """Default resources; override in tests with ``dg.materialize(..., resources=...)``."""
    return dg.Definitions(
        resources={
            "warehouse": WarehouseResource(),
            "dicom_sources": DicomSourcesResource(),
            "outcome_sources": OutcomeSourcesResource(),
        }
    )
