"""Helpers that shape asset metadata for the UI (no definitions here)."""

import dagster as dg


def _cell(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return round(v, 4) if v == v else None
    try:
        import numpy as np

        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, np.floating):
            return round(float(v), 4)
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def _kind(values: list) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def table_metadata(rows: list[dict], columns: list[str], limit: int = 20) -> dg.MetadataValue:
    """A table the Dagster UI shows as a grid on the asset page (not behind a link), first ``limit`` rows."""
    cells = [{c: _cell(r.get(c)) for c in columns} for r in rows[:limit]]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _kind([r[c] for r in cells])) for c in columns])
    return dg.MetadataValue.table(records=[dg.TableRecord(r) for r in cells], schema=schema)


#: Widest picture shown on an asset page (the metadata value column of a 1600-px window is ~590 px wide);
#: a wider one is shown scaled down, linked to its full size.
PAGE_WIDTH = 500


def picture(wh, name: str, data, alt: str = "plot") -> dg.MetadataValue:
    """A plot or montage for an asset page: stored under ``<warehouse>/plots`` and shown as markdown.

    With ``IMAGING_ASSETS_PICTURES_URL`` set (``make dev`` runs ``imaging-assets serve`` and sets it), the
    markdown is a short link to the served file (scaled to :data:`PAGE_WIDTH`, a click opens the full size)
    and the Dagster UI shows the picture inline on the asset page; without it the markdown carries the
    picture itself (a data URI, which the UI shows behind "Show Markdown", its limit for inline markdown
    being 1,000 characters).
    """
    import base64

    from imaging_assets import settings
    from imaging_assets.stages.thumbnails import PLOT_DIR, keep_picture, page_sized, picture_bytes, picture_url

    stored = keep_picture(wh, name, data)
    if stored is None:
        return dg.MetadataValue.md("_no plot (not enough data)_")
    base = settings.pictures_url()
    if base:
        small = page_sized(wh, stored, PAGE_WIDTH)
        return dg.MetadataValue.md(f"[![{alt}]({picture_url(wh, base, PLOT_DIR, small)})]"
                                   f"({picture_url(wh, base, PLOT_DIR, stored)})")
    encoded = base64.b64encode(picture_bytes(wh, PLOT_DIR, stored) or b"").decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


#: What the main columns mean (shown in each asset's Columns section beside the stored type).
COLUMN_NOTES = {
    "lesion_id": "stable id: sha1 of series UID, segmentation, segment and component",
    "patient_key": "pseudonymised patient id (keyed HMAC)", "series_key": "imaging_series key",
    "seg_key": "segmentations key", "modality": "CT, MR, PT, ...", "roi_name": "harmonised ROI name",
    "raw_label": "the segment / ROI name as stored", "volume_mm3": "lesion volume", "status": "ok or why not",
    "reason": "why a row is not usable", "extractable": "status ok and the series passed geometry QC",
    "space": "feature space: modality + extraction settings hash", "feature": "pyradiomics feature name",
    "image_type": "original or a filter (log-sigma-*, wavelet-*)", "feature_class": "shape, firstorder, glcm, ...",
    "value": "feature value", "cluster": "phenotype cluster", "time_months": "follow-up in months",
    "event": "1 = event, 0 = censored", "content_hash": "what the picture was drawn from",
    "path": "file path", "icc": "ICC(3,1)", "ci_low": "lower 95% bound", "ci_high": "upper 95% bound",
    "analysis": "perturbation or test_retest", "vector": "scaled robust features (float32)",
    "feature_set_version": "robust feature set version", "study_date": "study date",
}


def column_schema(table: str) -> dg.TableSchema:
    """The ``dagster/column_schema`` of a warehouse table, from its one declaration in ``store.schema``
    (the Lance tables ``lesion_vectors`` and ``lesion_embeddings`` from ``store.lance``)."""
    from imaging_assets.store import schema

    lance = table in ("lesion_vectors", "lesion_embeddings")
    if lance:
        from imaging_assets.store.lance import METADATA_TYPES

        columns = {"lesion_id": "VARCHAR", "vector": "FLOAT[dim]",
                   **{k: str(v).upper() for k, v in METADATA_TYPES.items() if k != "lesion_id"}}
    else:
        t = schema.TABLES[table]
        columns = {**t.columns, **t.extra}
        key = set(t.primary_key)
    return dg.TableSchema(columns=[
        dg.TableColumn(name, typ.lower(), description=COLUMN_NOTES.get(name),
                       constraints=dg.TableColumnConstraints(unique=True, nullable=False)
                       if not lance and {name} == key else None)
        for name, typ in columns.items()])


def table_definition(table: str) -> dict:
    """Definition metadata of an asset stored as one table: its name and its columns."""
    return {"dagster/table_name": table, "dagster/column_schema": column_schema(table)}
