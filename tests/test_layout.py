"""The house plan, enforced: which package may import which, no SQL in the Dagster layer, one reader of the
path variables, one schema, modules of a readable size, the stage chain in the graph's order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "imaging_assets"
DOMAIN = ("dicom", "features", "analysis", "demo")
#: Modules allowed past the size limit, each with the reason.
LONG_MODULES = {
    "cli.py": "the command line: one argparse parser and one thin function per command (the commands' work "
              "is in stages/ and defs/)",
    "dicom/headers.py": "one reader per DICOM header concern (pixel checks, geometry, PHI-safe fields) sharing "
                        "private helpers; splitting would scatter the quarantine rules",
    "dicom/segmentations.py": "SEG, RTSTRUCT and NIfTI/NRRD linking share the link rules and their tests",
    "features/lesions.py": "mask decoding per segmentation kind (SEG binary/fractional/labelmap, RTSTRUCT, "
                           "volumes) onto one grid: one concept",
    "features/extract.py": "the cropped extraction and its equality rules with stock pyradiomics, kept together",
    "features/fastclasses.py": "the fused pass: one feature function per pyradiomics class over shared helpers "
                               "(weights, empty angles, means over angles) and the extractor loop that calls them",
    "features/perturb.py": "the perturbation chain (noise, affine, mask growth, contour randomisation) as one "
                           "spec and one loader",
    "demo/generator.py": "the synthetic cohort: one generator for CT series, SEG, RTSTRUCT, outcomes and truth",
    "dicom/series.py": "series assembly and its geometry QC flags share the slice geometry helpers",
    "store/lance/memory.py": "the in-memory index: snapshot, filter masks, search paths and the graph cache share "
                             "one snapshot's arrays",
    "analysis/thumbnails.py": "one picture: panel geometry, orientation letters, windowing, outline, scale bar and "
                              "text sprites share the sampling grid of each panel",
}
MAX_LINES = 600
PATH_VARIABLES = ("IMAGING_ASSETS_WAREHOUSE", "IMAGING_ASSETS_LANCE_URI", "IMAGING_ASSETS_DICOM_ROOTS",
                  "IMAGING_ASSETS_MANIFESTS", "IMAGING_ASSETS_OUTCOMES", "IMAGING_ASSETS_DATA",
                  "IMAGING_ASSETS_USERS", "IMAGING_ASSETS_PICTURES_URL", "IMAGING_ASSETS_SERVER_URL",
                  "IMAGING_ASSETS_TOKEN", "IMAGING_ASSETS_PSEUDONYM_KEY_FILE")


def _modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def _imports(py: Path) -> set[str]:
    """Every module a file imports (top level and inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _package_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "imaging_assets" else None


@pytest.mark.parametrize("layer, forbidden", [
    ("store", {"dicom", "features", "analysis", "demo", "stages", "defs", "cli"}),
    ("dicom", {"store", "stages", "defs", "cli", "features", "analysis"}),
    ("features", {"store", "stages", "defs", "cli", "analysis"}),
    ("analysis", {"store", "stages", "defs", "cli", "dicom", "features"}),
    ("demo", {"store", "stages", "defs", "cli"}),
    ("stages", {"defs", "cli"}),
])
def test_imports_run_one_way(layer, forbidden):
    """defs / cli -> stages -> {dicom, features, analysis, store}; store imports no domain package."""
    offenders = []
    for py in _modules(layer):
        for name in _imports(py):
            if _package_of(name) in forbidden:
                offenders.append(f"{py.relative_to(PKG)} imports {name}")
    assert offenders == []


def test_nothing_below_defs_imports_dagster():
    offenders = [f"{py.relative_to(PKG)}: {n}" for layer in ("store", "stages", *DOMAIN) for py in _modules(layer)
                 for n in _imports(py) if n == "dagster" or n.startswith(("dagster.", "dagster_"))]
    assert offenders == []


def test_defs_hold_no_sql():
    """Every query behind asset metadata and checks lives in the stage module that owns the table."""
    sql = re.compile(r"\b(SELECT|INSERT|CREATE|DELETE|UPDATE)\s+[\w*(]", re.IGNORECASE)
    offenders = []
    for py in _modules("defs"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and sql.search(node.value):
                if not node.value.lstrip().startswith(("Run", "Runs")):  # docstrings describing a job
                    offenders.append(f"{py.relative_to(PKG)}:{node.lineno}: {node.value[:60]!r}")
    assert offenders == [], "\n".join(offenders)


def test_path_variables_are_read_in_one_module():
    readers = {}
    for py in _modules():
        text = py.read_text()
        for var in PATH_VARIABLES:
            if re.search(r"environ(?:\.get)?\s*[\[(]\s*['\"]" + var, text) or re.search(
                    r"getenv\(\s*['\"]" + var, text):
                readers.setdefault(var, set()).add(str(py.relative_to(PKG)))
    assert readers and set().union(*readers.values()) == {"settings.py"}, readers


def test_tables_are_declared_once():
    """No CREATE TABLE outside the schema module, except the user-named cohort tables (validated names)."""
    offenders = []
    for py in _modules():
        rel = str(py.relative_to(PKG))
        if rel == "store/schema.py":
            continue
        tree = ast.parse(py.read_text())
        in_fstring = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstring \
                    and re.search(r"CREATE\s+(OR\s+REPLACE\s+)?TABLE", node.value, re.IGNORECASE):
                offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if re.search(r"CREATE\s+(OR\s+REPLACE\s+)?TABLE", text, re.IGNORECASE) and "cohort" not in rel:
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_record_fields_match_the_schema():
    from imaging_assets.dicom import records
    from imaging_assets.store import schema

    pairs = {"FILE_FIELDS": "dicom_files", "QUARANTINE_FIELDS": "dicom_quarantine",
             "SERIES_FIELDS": "imaging_series", "SEGMENTATION_FIELDS": "segmentations", "LESION_FIELDS": "lesions"}
    for fields, table in pairs.items():
        assert list(getattr(records, fields)) == list(schema.TABLES[table].columns), table


def test_modules_stay_readable():
    long = {str(py.relative_to(PKG)): n for py in _modules() if (n := len(py.read_text().splitlines())) > MAX_LINES}
    unexplained = {m: n for m, n in long.items() if m not in LONG_MODULES}
    assert unexplained == {}, f"over {MAX_LINES} lines without a stated reason: {unexplained}"


def test_exceptions_live_in_one_module():
    defined = [f"{py.relative_to(PKG)}:{node.name}" for py in _modules() if py.name != "errors.py"
               for node in ast.walk(ast.parse(py.read_text()))
               if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
               and any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases)]
    assert defined == []


def test_chain_is_the_graph_order():
    import dagster as dg

    from imaging_assets import stages
    from imaging_assets.definitions import defs

    graph = defs().resolve_asset_graph()
    keys = [dg.AssetKey(name) for name in stages.CHAIN]
    position = {k: i for i, k in enumerate(keys)}
    for key in keys:
        assert all(position[p] < position[key] for p in graph.get(key).parent_keys if p in position), key
    assert [name for name, _ in stages._steps()] == list(stages.CHAIN)


def test_warehouse_from_settings_honours_the_lance_uri(monkeypatch, tmp_path):
    from imaging_assets.store.warehouse import Warehouse

    monkeypatch.setenv("IMAGING_ASSETS_WAREHOUSE", str(tmp_path / "wh"))
    monkeypatch.delenv("IMAGING_ASSETS_LANCE_URI", raising=False)
    assert Warehouse.from_settings().lance_uri == str(tmp_path / "wh" / "lance")
    monkeypatch.setenv("IMAGING_ASSETS_LANCE_URI", str(tmp_path / "elsewhere"))
    assert Warehouse.from_settings().lance_uri == str(tmp_path / "elsewhere")
    assert Warehouse.from_settings(root=tmp_path / "other").lance_uri == str(tmp_path / "elsewhere")
    assert Warehouse.from_settings(root=tmp_path / "x").duckdb_path == tmp_path / "x" / "warehouse.duckdb"
