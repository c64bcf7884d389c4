"""`imaging-assets` command line: the domain code without Dagster.

Sub-commands
------------
demo-data   write the synthetic DICOM cohort (default data/demo, 100 patients)
scan        crawl folders, assemble series, link segmentations; print a summary or JSON
extract     pyradiomics features of one lesion from an image and a mask
similar     the lesions most similar to a lesion (or to a new image + mask)
sql         read-only SQL over the warehouse, Lance tables included
cohort      make (or refresh) a similar-case cohort: the Dagster assets ``cohort`` + ``cohort_outcomes``
serve       publish the warehouse's pictures over HTTP for the Dagster UI (``make dev`` runs it)
summary     print what the warehouse holds (used at the end of ``make demo``)
users       add / list / remove the users of the web server (roles and tokens, imaging_assets.access)
rekey       rotate the pseudonymisation key: re-derive every stored patient key in one transaction
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from imaging_assets import settings


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from imaging_assets.demo.generator import generate_cohort
    from imaging_assets.demo.modalities import normalise_modalities

    try:
        modalities = normalise_modalities(args.modalities)
    except ValueError as exc:
        print(f"error: --modalities: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.if_missing and (out / "manifest.json").exists():
        print(f"demo cohort already present at {out} (delete it to regenerate)")
        return 0
    t0 = time.perf_counter()
    cohort = generate_cohort(out, n_patients=args.patients, seed=args.seed, workers=args.workers,
                             modalities=modalities)
    print(
        f"wrote {cohort.n_patients} patients, {cohort.n_lesions} lesions, {cohort.n_series} series "
        f"(modalities {', '.join(modalities)}), {cohort.n_files} files to {cohort.out_dir} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def scan_paths(paths: list[str], workers: int | None = None) -> dict[str, Any]:
    """Crawl ``paths`` (no warehouse), assemble series and link segmentations.

    Returns
    -------
    dict
        ``files``, ``quarantine``, ``series``, ``segmentations`` lists of records.
    """
    from imaging_assets.dicom.crawl import crawl
    from imaging_assets.dicom.pseudonym import pseudonym_secret
    from imaging_assets.dicom.segmentations import link_segmentations
    from imaging_assets.dicom.series import assemble_series

    secret = pseudonym_secret()
    result = crawl(paths, known=None, secret=secret, workers=workers)
    files = sorted(result.records, key=lambda r: r["path"])
    series = assemble_series([f for f in files if f["kind"] == "image"])
    segs = link_segmentations([f for f in files if f["kind"] in ("seg", "rtstruct")], series, secret=secret)
    for g in segs:
        g["segments"] = segment_listing(g)
    return {
        "files": files,
        "quarantine": sorted(result.quarantined, key=lambda r: r["path"]),
        "series": series,
        "segmentations": segs,
    }


def segment_listing(segmentation: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments of a segmentation row: ``number`` (SEG segment / RTSTRUCT ROI number), ``name`` (as
    stored) and ``roi_name`` (harmonised); ``extract --label`` takes the number, ``--segment`` either name."""
    from imaging_assets.features.lesions import harmonise_roi_name

    numbers = list(segmentation.get("segment_numbers") or [])
    names = list(segmentation.get("segment_labels") or [])
    return [{"number": int(n), "name": names[i] if i < len(names) else None,
             "roi_name": harmonise_roi_name(names[i]) if i < len(names) else None}
            for i, n in enumerate(numbers)]


def _segments_text(segments: list[dict[str, Any]]) -> str:
    parts = []
    for item in segments:
        name = item["name"]
        text = f"{item['number']} {json.dumps(name, ensure_ascii=False)}" if name is not None else str(item["number"])
        if name is not None and item["roi_name"] != name.strip():
            text += f" ({item['roi_name']})"
        parts.append(text)
    return ", ".join(parts) or "none"


def _cmd_scan(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"error: path(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = scan_paths(args.paths, workers=args.workers)
    if args.json:
        json.dump(out, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    print(f"files catalogued: {len(out['files'])} ({dict(Counter(f['kind'] for f in out['files']))})")
    print(f"files quarantined: {len(out['quarantine'])}")
    for reason, n in Counter(q["reason"] for q in out["quarantine"]).most_common():
        print(f"  {reason}: {n}")
    for q in out["quarantine"][: args.show]:
        print(f"    {q['path']}: {q['message']}")
    flagged = [s for s in out["series"] if s["flags"]]
    print(f"series: {len(out['series'])} ({len(flagged)} with geometry flags)")
    for s in out["series"][: args.show]:
        flags = ", ".join(s["flags"]) or "ok"
        print(f"  {s['series_instance_uid']}  {s['modality']}  {s['n_slices']} slices  [{flags}]")
        for detail in s["flag_details"]:
            print(f"      {detail}")
    print(f"segmentations: {len(out['segmentations'])}")
    for g in out["segmentations"][: args.show]:
        how = g["link_rule"] or f"UNLINKED: {g['unlinked_reason']}"
        print(f"  {g['kind']:8s} {g['path']}  -> {g['linked_series_key'] or '-'}  ({how})")
        print(f"      segments: {_segments_text(g['segments'])}")
    return 0


def _params_provenance(params: str | None, phash: str | None) -> dict[str, Any]:
    """Which parameters an extraction used: the user's file (``--params``), else the modality preset whose
    hash is the outcome's (the preset is chosen inside the extraction, by the image's modality)."""
    from imaging_assets.features.params import MODALITY_PRESETS, PRESETS_DIR, load_params, params_hash, preset_path

    if params:
        path = Path(params)
        if not path.is_file():
            path = preset_path(params)  # a preset name ("ct", "mr.yaml"), as --params accepts
        preset = path.name if path.resolve().parent == PRESETS_DIR.resolve() else None
        return {"params_source": "preset" if preset else "file", "params_file": str(path.resolve()),
                "preset": preset, "modality": None}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        if params_hash(load_params(path)) == phash:
            modalities = sorted(m for m, f in MODALITY_PRESETS.items() if f == path.name and len(m) == 2)
            return {"params_source": "preset", "params_file": str(path.resolve()), "preset": path.name,
                    "modality": modalities[0] if modalities else None}
    return {"params_source": "unknown", "params_file": None, "preset": None, "modality": None}


def _cmd_extract(args: argparse.Namespace) -> int:
    from imaging_assets.errors import MaskGeometryError
    from imaging_assets.features.pipeline import extract_one

    try:
        outcome = extract_one(args.image, args.mask, label=args.label, segment=args.segment,
                              params=args.params, modality=args.modality, resample_mask=args.resample_mask)
    except MaskGeometryError as exc:
        print(f"error: {exc}; pass --resample-mask to resample it onto the image grid anyway", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # bad inputs, or a --params file that is not there
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return 1
    used = _params_provenance(args.params, outcome.params_hash)
    if args.json:
        provenance = {
            "lesion_id": outcome.lesion_id,
            "image": str(args.image),
            "mask": str(args.mask),
            "label": args.label,
            "segment": args.segment,
            "pyradiomics_version": outcome.pyradiomics_version,
            "params_hash": outcome.params_hash,
            **used,
            "image_hash": outcome.image_hash,
            "mask_hash": outcome.mask_hash,
            "crop_index": list(outcome.crop_index) if outcome.crop_index is not None else None,
            "crop_size": list(outcome.crop_size) if outcome.crop_size is not None else None,
            "resample_mask": bool(args.resample_mask),
            "elapsed_s": round(outcome.elapsed_s, 3),
        }
        json.dump({"features": outcome.features, "provenance": provenance}, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for name in sorted(outcome.features):
            print(f"{name}\t{outcome.features[name]:.10g}")
        print(f"# {len(outcome.features)} features in {outcome.elapsed_s:.2f} s, pyradiomics "
              f"{outcome.pyradiomics_version}, params {outcome.params_hash} ({used['preset'] or used['params_file']})",
              file=sys.stderr)
    return 0


def _warehouse(args: argparse.Namespace):
    """The warehouse named by ``--warehouse`` (Lance URI from the settings), or None after printing why."""
    from imaging_assets.store.warehouse import Warehouse

    wh = Warehouse.from_settings(root=args.warehouse)
    if not wh.duckdb_path.exists():
        print(f"error: no warehouse at {wh.duckdb_path}; run `make demo` first", file=sys.stderr)
        return None
    return wh


def _cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from imaging_assets.errors import QueryRefused
    from imaging_assets.store.audit import current_user
    from imaging_assets.store.sql import run_sql

    wh = _warehouse(args)
    if wh is None:
        return 2
    try:  # the OS user (IMAGING_ASSETS_USER where set, as for every audit row): whose audit_log rows it sees
        df = run_sql(wh, args.query, user=current_user())
    except QueryRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    except (duckdb.Error, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    fmt = "json" if args.json else "csv" if args.csv else args.format
    if fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso", default_handler=str) + "\n")
    elif fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", 50, "display.width", 200):
            print(df.drop(columns=[c for c in df.columns if c == "vector"]) if not args.vectors else df)
    return 0


def _parse_filters(items: list[str]) -> dict:
    """``col=value[,value...]`` or ``col=lo..hi`` (dates / volumes) into a filter dict.

    Repeating a column adds values (``--where modality=CT --where modality=MR`` = ``modality=CT,MR``: any of
    them, OR); a column takes one range only, and not a range and values at once (a clear error: silently
    keeping one of them would answer another question)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"filter {item!r}: expected column=value")
        col, value = item.split("=", 1)
        if ".." in value:
            if col in out:
                raise ValueError(f"filter {item!r}: {col} is filtered twice; a column takes one range "
                                 f"(lo..hi) and no other values")
            lo, hi = value.split("..", 1)
            conv = (lambda x: float(x) if x else None) if col == "volume_mm3" else (lambda x: x or None)
            out[col] = (conv(lo), conv(hi))
        else:
            vals = value.split(",")
            vals = [int(v) for v in vals] if col == "cluster" else vals
            if isinstance(out.get(col), tuple):
                raise ValueError(f"filter {item!r}: {col} already has a range; a column takes one range or "
                                 f"values, not both")
            out[col] = [*out.get(col, []), *(v for v in vals if v not in out.get(col, []))]
    return out


def _similar_via_server(args: argparse.Namespace, filters: dict) -> tuple[list[dict], float, str] | None:
    """The rows (with explanations) of ``similar <lesion_id>`` from a running ``imaging-assets serve``
    (``IMAGING_ASSETS_SERVER_URL`` + ``IMAGING_ASSETS_TOKEN``): its vectors and tables are warm, so the
    command costs an HTTP request instead of opening the files. None when no server is configured, the
    query is one the server does not answer (a new image, an old ``--version``) or the server is down.

    Raises
    ------
    RuntimeError
        The server refused (401/403, naming why) or failed.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    server = settings.search_server()
    if server is None or args.local or args.lesion_id is None or args.version is not None or args.feature_space:
        return None
    url, token = server
    params = {"k": args.k, "filters": json.dumps({c: ({"range": list(v)} if isinstance(v, tuple) else v)
                                                  for c, v in filters.items()}),
              **({"space": args.space} if args.space else {}),
              "all_lesions": "0" if args.one_per_patient else "1",
              "include_same_patient": "1" if args.include_same_patient else "0"}
    target = f"{url.rstrip('/')}/api/similar/{urllib.parse.quote(args.lesion_id, safe='')}?{urllib.parse.urlencode(params)}"
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"}),
                                    timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error", "")
        except ValueError:
            message = ""
        if err.code == 404:
            raise KeyError(message) from None
        if err.code == 400:
            raise ValueError(message) from None
        raise RuntimeError(f"the server at {url} answered {err.code}: {message}") from None
    except (urllib.error.URLError, OSError):  # not running: search in process
        return None
    ms = (time.perf_counter() - t0) * 1000
    rows = answer["results"]
    for r in rows:
        r.pop("thumbnail_url", None)
        if not args.explain:
            r.pop("explanation", None)
    return rows, ms, f"via the server at {url}"


def _cmd_similar(args: argparse.Namespace) -> int:
    try:
        filters = _parse_filters((args.filter or []) + ([f"modality={args.modality}"] if args.modality else []))
        from imaging_assets.stages.similar import split_space

        args.space, args.feature_space = split_space(args.space, args.feature_space)
        via = _similar_via_server(args, filters)
        header, space = None, args.feature_space
        if via is not None:
            rows, ms, where = via
        else:
            rows, ms, header = _similar_in_process(args, filters)
            where = "including audit"
            if rows is None:
                return 2
    except (ValueError, KeyError, RuntimeError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(rows, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    searched = rows[0]["space"] if rows else (header or {}).get("space", space)
    if header:
        print(f"query extracted with the settings of space {header['space']} (params {header['params_hash'][:12]}, "
              f"{header['params_source']}; robust set {header['feature_set_version']}"
              f"{'; embedding model ' + header['model_version'] if header.get('model_version') else ''})")
    how = rows[0].get("search_space") if rows else args.space
    print(f"{len(rows)} similar lesions in feature space {searched}, searched by {how or 'default'} "
          f"({ms:.0f} ms {where})")
    for r in rows:
        dist = "d=   n/a" if r.get("distance") is None else f"d={r['distance']:.3f}"
        deep = "" if r.get("deep_distance") is None else f"  deep={r['deep_distance']:.3f}"
        print(f"{r['rank']:3d}  {r['lesion_id']}  {dist}{deep}  {r['patient_key']}  {r['modality']}  "
              f"{r['roi_name']} ({r['raw_label']}, segment {r['segment_number']})  {r['volume_mm3'] or 0:.0f} mm3  "
              f"{r['study_date']}  cluster={r['cluster']}")
        if r.get("explanation") is not None:
            _print_explanation(r["explanation"])
    return 0


def _similar_in_process(args: argparse.Namespace, filters: dict) -> tuple[list[dict] | None, float, dict | None]:
    """``similar`` opening the warehouse's files itself: (rows, search ms, the new lesion's header)."""
    from imaging_assets.stages.similar import explain_similar, needs_embedding, query_vector, similar_rows

    wh = _warehouse(args)
    if wh is None:
        return None, 0.0, None
    vector, space, header, q = None, args.feature_space, None, None
    if args.lesion_id is None:
        if not (args.image and args.mask):
            raise ValueError("give a lesion id, or --image and --mask of a new lesion")
        q = query_vector(wh, args.image, args.mask, segment=args.segment, params=args.params,
                         space=args.feature_space, modality=args.image_modality, resample_mask=args.resample_mask,
                         embed=needs_embedding(args.space))
        vector, space = q.vector, q.space
        header = {"space": q.space, "params_hash": q.params_hash, "params_source": q.params_source,
                  "feature_set_version": q.feature_set_version, "model_version": q.model_version}
    t0 = time.perf_counter()
    # the rows of find_similar without its polars frame (the same search; the command stays quick to start)
    rows = similar_rows(lesion_id=args.lesion_id, vector=vector, k=args.k, where=filters,
                        exclude_same_patient=not args.include_same_patient, warehouse=wh,
                        version=args.version, feature_space=space, space=args.space,
                        one_per_patient=args.one_per_patient, embedding=None if q is None else q.embedding)
    ms = (time.perf_counter() - t0) * 1000
    if args.explain:
        for r, e in zip(rows, explain_similar(wh, rows, reference_lesion_id=args.lesion_id, query=q,
                                              version=args.version)):
            r["explanation"] = e.to_dict() if e is not None else None
    return rows, ms, header


def _print_explanation(e: dict) -> None:
    """The explanation of one result (:meth:`~imaging_assets.features.explain.Explanation.to_dict`), indented."""
    from imaging_assets.features.explain import percentile_words as _pct

    groups = sorted(e["groups"].items(), key=lambda kv: -kv[1])
    print("       why: " + ", ".join(f"{g} {s:.0%}" for g, s in groups if s >= 0.005) + " of the squared distance")
    for label, items in (("agree ", e["agree"]), ("differ", e["differ"])):
        for c in items:
            share = f"  ({c['share']:.0%} of d^2)" if label == "differ" else ""
            print(f"       {label}  {c['name']}: reference {_pct(c['reference_percentile'])}, "
                  f"this lesion {_pct(c['neighbour_percentile'])}{share}")


def _cmd_backfill(args: argparse.Namespace) -> int:
    """Backfill every batch of series (or ``--partitions``) of the extraction job in the instance of
    DAGSTER_HOME, and with ``--wait`` follow the runs; then ``--load`` materializes radiomics_features."""
    from imaging_assets.defs.backfill import run_backfill, submit_backfill
    from imaging_assets.stages.batches import batch_status

    wh = _warehouse(args)
    if wh is None:
        return 2
    status = batch_status(wh)
    partitions = args.partitions.split(",") if args.partitions else [b["batch"] for b in status]
    if not partitions:
        print("error: no batches of series yet: materialize `lesions` first (it assigns them)", file=sys.stderr)
        return 2
    if not args.wait:
        tag = submit_backfill(args.job, partitions)
        print(f"backfill {tag}: {len(partitions)} partitions of {args.job} submitted to the instance in "
              f"{os.environ.get('DAGSTER_HOME')} (runs tagged imaging_assets/backfill={tag})")
        return 0
    print(f"backfilling {len(partitions)} partitions of {args.job} in {os.environ.get('DAGSTER_HOME')}", flush=True)
    report = run_backfill(args.job, partitions, retries=args.retries, timeout_s=args.timeout)
    for partition, (run_id, st) in report.runs.items():
        print(f"  {partition}  {st:<8} run {run_id}")
    print(f"{sum(s == 'SUCCESS' for _, s in report.runs.values())} of {len(partitions)} partitions succeeded "
          f"({report.attempts} runs, retries included) in {report.elapsed_s} s")
    if not report.ok:
        return 1
    if args.load:
        r = subprocess.run([str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m",
                            "imaging_assets.definitions", "--select", "radiomics_features"], check=False)
        return r.returncode
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    """Materialize the cohort's partition of ``cohort`` and ``cohort_outcomes`` in the Dagster instance of
    ``DAGSTER_HOME`` (so the cohort is in the UI's catalog, with its run), adding the partition first."""
    import dagster as dg

    from imaging_assets.stages.cohorts import cohort_table_name, largest_lesion

    try:
        cohort_table_name(args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wh = _warehouse(args)
    if wh is None:
        return 2
    config: dict[str, Any] = {"k": args.k}
    if args.config:  # the search page's "save as cohort": the whole launchpad config
        try:
            from imaging_assets.defs.cohorts import CohortConfig

            config = json.loads(args.config)
            CohortConfig(**config)
        except Exception as exc:  # noqa: BLE001 - bad JSON or a field the launchpad does not know
            print(f"error: --config: {exc}", file=sys.stderr)
            return 2
    else:
        lesion = args.lesion_id
        if args.largest:
            lesion = largest_lesion(wh, modality=args.modality)
            if lesion is None:
                print("error: the warehouse has no lesion with a vector", file=sys.stderr)
                return 2
        if lesion:
            config["reference_lesion_id"] = lesion
        elif args.image or args.mask:
            config.update(image=args.image, mask=args.mask, segment=args.segment)
        if args.modality:
            config["modality"] = [m.strip() for m in args.modality.split(",") if m.strip()]
        if args.space:
            config["space"] = args.space
    try:
        instance = dg.DagsterInstance.get()
    except Exception as exc:  # noqa: BLE001 - DAGSTER_HOME unset or unreadable
        print(f"error: no Dagster instance ({exc}); set DAGSTER_HOME (make sets .dagster_home)", file=sys.stderr)
        return 2
    from imaging_assets.defs.cohorts import materialize_cohort
    from imaging_assets.defs.resources import WarehouseResource

    result = materialize_cohort(WarehouseResource(root=wh.files, lance=wh.lance_uri), args.name,
                                config if (len(config) > 1 or args.config) else None, user=args.requested_by,
                                instance=instance)
    table = cohort_table_name(args.name)
    if args.json:
        json.dump({"name": args.name, "table": table, "run_id": result.run_id, "success": result.success,
                   "errors": result.errors, "config": config}, sys.stdout)
        sys.stdout.write("\n")
        return 0 if result.success else 1
    if not result.success:
        for message in result.errors:
            print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"cohort {args.name}: run {result.run_id}; table {table} "
          f"(imaging-assets sql \"SELECT rank, lesion_id, patient_key, distance, why FROM {table}\")")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from imaging_assets.store.warehouse import Warehouse
    from imaging_assets.web import serve

    wh = Warehouse.from_settings(root=args.warehouse)
    print(f"searching {wh.files} on http://{args.host}:{args.port}/ (pictures under /pictures; Ctrl-C stops)",
          flush=True)
    serve(wh, host=args.host, port=args.port)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from imaging_assets.stages.discovery import warehouse_summary

    wh = _warehouse(args)
    if wh is None:
        return 2
    summary = warehouse_summary(wh)
    print(f"warehouse {wh.duckdb_path}")
    for table, n in summary.rows_by_table.items():
        print(f"  {table:28s} {n:>8d} rows")
    for reason, n in summary.quarantine_by_reason.items():
        print(f"    quarantined {reason}: {n}")
    for flag, n in summary.series_flags.items():
        print(f"    series flagged {flag}: {n}")
    for rule, n in summary.link_rules.items():
        print(f"    segmentations {rule}: {n}")
    return 0


def _cmd_rekey(args: argparse.Namespace) -> int:
    """Rotate the warehouse to the configured key (the old key: IMAGING_ASSETS_OLD_PSEUDONYM_KEY or a file)."""
    from imaging_assets.errors import PseudonymKeyError
    from imaging_assets.stages.keys import old_key, rekey

    wh = _warehouse(args)
    if wh is None:
        return 2
    try:
        r = rekey(wh, old_key(args.old_key_file), manifests=settings.manifests(), forget_unmapped=args.forget_unmapped)
    except PseudonymKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "give the old key" in str(exc) else 1
    print(f"rekeyed {r.patients} patients in {wh.duckdb_path} ({sum(r.rows_changed.values())} rows; "
          f"{r.files_read} DICOM and {r.outcome_files_read} outcome files re-read) in {r.elapsed_s} s; key "
          f"fingerprint {(r.old_fingerprint or 'none')[:12]} -> {r.new_fingerprint[:12]}"
          f"{'; Lance vectors re-synced' if r.lance_synced else ''}")
    print("\n".join([f"  {c:48s} {n:>8d} rows" for c, n in r.rows_changed.items()] + [f"  note: {n}" for n in r.notes]))
    return 0


def _cmd_users(args: argparse.Namespace) -> int:
    """``users add`` (prints the new token once, as the last line), ``users list``, ``users remove``."""
    from imaging_assets import access
    from imaging_assets.errors import AccessError

    path = Path(args.file) if args.file else settings.users_file()
    try:
        if args.users_command == "add":
            token = access.add_user(args.name, args.role, path, replace=args.replace)
            print(f"{'replaced' if args.replace else 'added'} user {args.name} (role {args.role}) in {path}; its token "
                  "follows, shown this once (only its SHA-256 is stored):", file=sys.stderr)
            sys.stderr.flush()
            print(token)
        elif args.users_command == "remove":
            access.remove_user(args.name, path)
            print(f"removed user {args.name} from {path}: their token no longer authenticates")
        else:
            users = access.list_users(path)
            if args.json:
                json.dump(users, sys.stdout, indent=1)
                sys.stdout.write("\n")
                return 0
            if not users:
                print(f"no users in {path} (add one: imaging-assets users add NAME --role viewer|analyst|admin)")
                return 0
            width = max(len("name"), *(len(u["name"]) for u in users))
            print(f"{'name':{width}s}  {'role':7s}  created_at")
            for u in users:
                print(f"{u['name']:{width}s}  {u['role']:7s}  {u['created_at'] or '-'}")
    except AccessError as exc:  # bad name or role, unknown user, existing user, unreadable file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="imaging-assets", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo-data", help="write the synthetic DICOM cohort")
    d.add_argument("--out", default=str(settings.demo_dir()), help="output folder (default data/demo)")
    d.add_argument("--patients", type=int, default=100, help="number of patients (default 100)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    d.add_argument("--if-missing", action="store_true", help="do nothing when the cohort already exists")
    d.add_argument("--modalities", default="CT", metavar="CT[,MR,PT]",
                   help="image series per patient: CT (default, the CT-only demo) or e.g. CT,MR,PT for a mixed "
                        "cohort (a T1 MR and an FDG PET series of the same lesions, each with its segmentation)")
    d.set_defaults(func=_cmd_demo_data)

    s = sub.add_parser("scan", help="catalog DICOM folders without Dagster or a warehouse")
    s.add_argument("paths", nargs="+", help="files or folders to scan")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    s.add_argument("--show", type=int, default=20, help="rows to list per section (default 20)")
    s.set_defaults(func=_cmd_scan)

    e = sub.add_parser("extract", help="pyradiomics features of one lesion (same code path as the asset)")
    e.add_argument("--image", required=True, help="DICOM series folder, NIfTI or NRRD image")
    e.add_argument("--mask", required=True, help="DICOM SEG, RTSTRUCT, NIfTI or NRRD mask")
    pick = e.add_mutually_exclusive_group()
    pick.add_argument("--label", type=int, help="segment number / ROI number / label value")
    pick.add_argument("--segment", help="segment or ROI name (raw or harmonised, e.g. GTV)")
    e.add_argument("--params", help="pyradiomics YAML (default: the modality's preset in data/params)")
    e.add_argument("--modality", help="modality of a NIfTI/NRRD image (CT, MR, PT; default CT)")
    e.add_argument("--resample-mask", action="store_true",
                   help="resample a NIfTI/NRRD mask whose grid does not belong to the image (default: refuse it)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object: {\"features\": {name: value}, \"provenance\": {...}}")
    e.set_defaults(func=_cmd_extract)

    q = sub.add_parser("sql", help="read-only SQL over the warehouse (DuckDB tables + Lance views), audited")
    q.add_argument("query", help="a SELECT query, e.g. \"SELECT * FROM lesions LIMIT 5\"")
    q.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--format", choices=["table", "csv", "json"], default="table",
                     help="table (default), csv, or json (a list of row objects)")
    fmt.add_argument("--json", action="store_true", help="same as --format json")
    fmt.add_argument("--csv", action="store_true", help="same as --format csv")
    q.add_argument("--max-rows", type=int, default=50, help="rows shown in the table view")
    q.add_argument("--vectors", action="store_true", help="show vector columns too")
    q.set_defaults(func=_cmd_sql)

    f = sub.add_parser("similar", help="lesions most similar to a lesion id or a new image + mask, audited")
    f.add_argument("lesion_id", nargs="?", help="reference lesion id (see the lesions table)")
    f.add_argument("--image", help="or: image of a new lesion (DICOM folder, NIfTI, NRRD)")
    f.add_argument("--mask", help="... and its mask (SEG, RTSTRUCT, NIfTI, NRRD)")
    f.add_argument("--segment", help="segment / ROI name in the mask")
    f.add_argument("--space", help="search space: radiomics (the robust features), deep (the learned embeddings) "
                                   "or hybrid (both, rank-fused); default radiomics, the best measured (README)")
    f.add_argument("--feature-space", help="feature space to search, e.g. CT-1a2b3c4d (default: the lesion's own; "
                                           "for --image, the warehouse's only space of the image's modality)")
    f.add_argument("--params", help="for --image: a pyradiomics YAML; the warehouse must hold lesions extracted "
                                    "with it (default: the settings of the space searched)")
    f.add_argument("--image-modality", help="for a NIfTI/NRRD --image: its modality (CT, MR, PT)")
    f.add_argument("--resample-mask", action="store_true",
                   help="for --image: resample a NIfTI/NRRD mask whose grid does not belong to the image")
    f.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    f.add_argument("--filter", "--where", action="append", metavar="COL=VALUE", dest="filter",
                   help="modality=CT,MR | roi_name=GTV | body_part=CHEST | cluster=0,2 | "
                        "study_date=2020-01-01..2022-12-31 | volume_mm3=500..5000 (repeatable: a repeated column "
                        "adds values, OR; one range per column)")
    f.add_argument("--modality", help="shorthand for --where modality=VALUE[,VALUE]")
    f.add_argument("--version", type=int, help="search an older lesion_vectors table version")
    f.add_argument("--include-same-patient", action="store_true",
                   help="keep the query lesion's patient (the lesion itself then comes first)")
    f.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    f.add_argument("--one-per-patient", action="store_true",
                   help="only the closest lesion of each patient (as in cohorts)")
    f.add_argument("--explain", action="store_true",
                   help="why each result is close: feature-group shares of the squared distance, the features "
                        "that agree and differ most, with both lesions' percentiles (with --json: 'explanation')")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.add_argument("--local", action="store_true", help="open the warehouse's files even when a server is "
                   "configured (IMAGING_ASSETS_SERVER_URL + IMAGING_ASSETS_TOKEN; then the server answers, fast)")
    f.set_defaults(func=_cmd_similar)

    c = sub.add_parser("cohort", help="make or refresh a similar-case cohort as Dagster assets (in DAGSTER_HOME)")
    c.add_argument("name", help="cohort name (lower-case letters, digits, underscores); its table is cohort_<name>")
    c.add_argument("lesion_id", nargs="?", help="reference lesion id; none (and no --image) re-runs the stored query")
    c.add_argument("--largest", action="store_true", help="reference: the largest lesion with a vector")
    c.add_argument("--image", help="or: image of a new lesion (DICOM folder, NIfTI, NRRD)")
    c.add_argument("--mask", help="... and its mask")
    c.add_argument("--segment", help="segment / ROI name in the mask")
    c.add_argument("-k", type=int, default=20, help="number of similar patients (default 20)")
    c.add_argument("--modality", help="filter: modalities, e.g. CT or CT,MR")
    c.add_argument("--space", choices=["radiomics", "deep", "hybrid"],
                   help="search space (default radiomics, the best measured; README 'Deep embeddings')")
    c.add_argument("--config", help="the cohort op's whole config as JSON (the launchpad's fields: "
                   "reference_lesion_id or image + mask, k, filters); replaces the options above")
    c.add_argument("--requested-by", help="who asked, for the run's tags and the audit row (the search page "
                   "passes its signed-in user; default: IMAGING_ASSETS_USER or the login name)")
    c.add_argument("--json", action="store_true", help="print the run as JSON (name, table, run_id, success, errors)")
    c.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    c.set_defaults(func=_cmd_cohort)

    b = sub.add_parser("backfill", help="run the partitioned extraction (one run per batch of series) in the Dagster "
                       "instance of DAGSTER_HOME: locally, or on Celery workers (README: Running on a cluster)")
    b.add_argument("--job", default="extraction_job", choices=["extraction_job", "extraction_celery_job"],
                   help="extraction_job (steps in local processes) or extraction_celery_job (steps on Celery "
                   "workers; needs the PostgreSQL instance and DAGSTER_CELERY_BROKER_URL / _BACKEND_URL)")
    b.add_argument("--partitions", help="comma-separated batch ids (default: every batch)")
    b.add_argument("--wait", action="store_true", help="follow the runs until every partition finished")
    b.add_argument("--load", action="store_true", help="with --wait: then materialize radiomics_features (loads "
                   "the batches into DuckDB)")
    b.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait at most (default 3600)")
    b.add_argument("--retries", type=int, default=2, help="with --wait: submit partitions whose run failed again, "
                   "up to this many times (default 2)")
    b.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    b.set_defaults(func=_cmd_backfill)

    v = sub.add_parser("serve", help="the similar-case search page and JSON API, and the pictures of the Dagster UI "
                                            "(loopback by default)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8321, help="port (default 8321)")
    v.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    v.set_defaults(func=_cmd_serve)

    m = sub.add_parser("summary", help="print what the warehouse holds")
    m.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    m.set_defaults(func=_cmd_summary)

    r = sub.add_parser("rekey", help="rotate the pseudonymisation key: re-derive every stored patient key (from "
                       "the sources, with the configured new key) in one transaction")
    r.add_argument("--warehouse", default=settings.warehouse_location(), help="warehouse folder or s3://bucket/prefix")
    r.add_argument("--old-key-file", help="file holding the old key (default: IMAGING_ASSETS_OLD_PSEUDONYM_KEY)")
    r.add_argument("--forget-unmapped", action="store_true", help="set stored patient keys that no source gives "
                   "any more (files deleted since) to NULL instead of refusing")
    r.set_defaults(func=_cmd_rekey)

    u = sub.add_parser("users", help="users of the web server: roles and tokens (tokens are stored hashed)")
    u.add_argument("--file", help="users file (default IMAGING_ASSETS_USERS, else <warehouse>/users.json)")
    users = u.add_subparsers(dest="users_command", required=True)
    ua = users.add_parser("add", help="add a user and print their token once (the last line of the output)")
    ua.add_argument("name", help="user name: 1-64 of a-z, 0-9, '.', '_', '-'")
    ua.add_argument("--role", required=True, help="viewer (search, view), analyst (viewer + save cohorts + "
                                                  "read-only SQL) or admin (everything, manage users)")
    ua.add_argument("--replace", action="store_true", help="re-issue the token (and role) of an existing user")
    ul = users.add_parser("list", help="the users: name, role, created_at (never tokens)")
    ul.add_argument("--json", action="store_true", help="print JSON")
    ur = users.add_parser("remove", help="remove a user (their token stops working)")
    ur.add_argument("name", help="user name")
    for sp in (ua, ul, ur):
        sp.add_argument("--file", default=argparse.SUPPRESS, help="users file (as before the sub-command)")
    u.set_defaults(func=_cmd_users)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imaging-assets`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
