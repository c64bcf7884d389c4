"""Resources shared by every stage: where the warehouse is and which folders hold the DICOM archive."""

import os

import dagster as dg
from pydantic import Field

from imaging_assets import settings
from imaging_assets.store.objects import S3Options
from imaging_assets.store.warehouse import Warehouse

#: Resource field -> the standard AWS environment variable it is read from (``dg.EnvVar``) when set.
S3_ENV_FIELDS = {
    "s3_endpoint_url": "AWS_ENDPOINT_URL",
    "s3_region": "AWS_REGION",
}


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse: ``warehouse.duckdb`` (SQL face, catalog tables) on local disk, and its files and tables
    (Lance, Delta, partition results, thumbnails, crops, models) in the same folder or on object storage.

    Connections are opened briefly inside ``with`` blocks, as dagster-duckdb's ``DuckDBResource`` does;
    a writer waits (with backoff) while another process holds DuckDB's single write lock. The S3 fields are
    filled from the standard AWS environment variables through ``dg.EnvVar`` (never stored in run config).
    """

    root: str = Field(
        default_factory=settings.warehouse_location,
        description="Warehouse folder, or s3://bucket/prefix for its files and tables (env "
        "IMAGING_ASSETS_WAREHOUSE; default data/warehouse). On S3 the DuckDB file stays local "
        "(IMAGING_ASSETS_DUCKDB_DIR).",
    )

    lance: str = Field(
        default="",
        description="LanceDB URI for the vector tables: a folder or an object-store URI (s3://...); "
        "empty = env IMAGING_ASSETS_LANCE_URI, else <root>/lance.",
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (AWS_ENDPOINT_URL).")
    s3_region: str | None = Field(default=None, description="S3 region (AWS_REGION).")
    # No credential fields: like the pseudonymisation secret, a config field's value can end up in run storage;
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN are read from the environment only.

    def get_warehouse(self) -> Warehouse:
        """The :class:`~imaging_assets.store.warehouse.Warehouse` every stage step takes."""
        s3 = None
        if settings.is_remote(self.root) or settings.is_remote(self.lance or ""):
            env = S3Options.from_env()
            s3 = S3Options(
                endpoint_url=self.s3_endpoint_url or env.endpoint_url,
                region=self.s3_region or env.region,
                access_key_id=env.access_key_id,
                secret_access_key=env.secret_access_key,
                session_token=env.session_token,
            )
        return Warehouse.from_settings(root=self.root, lance_uri=self.lance or None, s3=s3)


def s3_env_vars() -> dict[str, dg.EnvVar]:
    """``dg.EnvVar`` of each S3 field whose environment variable is set (an unset EnvVar would fail)."""
    return {name: dg.EnvVar(var) for name, var in S3_ENV_FIELDS.items() if os.environ.get(var)}


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
            "warehouse": WarehouseResource(**s3_env_vars()),
            "dicom_sources": DicomSourcesResource(),
            "outcome_sources": OutcomeSourcesResource(),
        }
    )
