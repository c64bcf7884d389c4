"""The search server's HTML: server-rendered pages with a few forms, no script and no build step."""

from __future__ import annotations

import html
from typing import Any

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1250px}
table{border-collapse:collapse}td,th{padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top;text-align:left}
img.thumb{width:300px;height:auto;background:#111}.bar{display:inline-block;height:.7rem;background:#4a7}
.error{color:#b00}.ok{color:#060}form{margin:.6rem 0}form input,form select{margin:.2rem .4rem .2rem 0}
small{color:#555}nav{margin-bottom:.8rem}nav form{display:inline}fieldset{border:1px solid #ccc;margin:.6rem 0}
textarea{width:100%;font-family:monospace}.km{margin:.5rem 0}"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1>{body}</body></html>")


def login_form() -> str:
    return ("<form method='post' action='/login'><label>Access token <input type='password' name='token' "
            "size='60' autofocus></label> <button type='submit'>Sign in</button></form>"
            "<p><small>An administrator makes one with <code>imaging-assets users add NAME --role viewer</code>."
            "</small></p>")


def nav(user: Any) -> str:
    from imaging_assets.access import SQL

    sql = " · <a href='/sql'>SQL</a>" if user.can(SQL) else ""
    return (f"<nav><a href='/'>Search</a>{sql} · <form method='post' action='/logout'>"
            "<button type='submit'>Sign out</button></form></nav>")


def _field(q: Any, name: str, label: str, size: int = 10) -> str:
    return (f"<label>{label} <input name='{name}' size='{size}' "
            f"value='{html.escape(str(q.get(name) or ''), quote=True)}'></label>")


def _filter_fields(q: Any) -> str:
    return (_field(q, "k", "k", 3) + _field(q, "modality", "Modality", 6) + _field(q, "date_from", "Date from") +
            _field(q, "date_to", "to") + _field(q, "min_volume", "Volume from (mm³)", 8) +
            _field(q, "max_volume", "to", 8) + _field(q, "cluster", "Cluster", 4))


def _space_field(q: Any) -> str:
    """The search space: default (:data:`~imaging_assets.stages.similar.DEFAULT_SPACE`), radiomics, deep, hybrid."""
    from imaging_assets.stages.similar import DEFAULT_SPACE

    chosen = str(q.get("space") or "")
    options = "".join(f"<option value='{v}'{' selected' if v == chosen else ''}>{label}</option>" for v, label in (
        ("", f"default ({DEFAULT_SPACE})"), ("radiomics", "radiomics features"), ("deep", "deep embedding"),
        ("hybrid", "hybrid: features + deep")))
    return f"<label>Compare by <select name='space'>{options}</select></label>"


def search_form(q: Any) -> str:
    return ("<form class='search' method='get' action='/'>" + _field(q, "lesion_id", "Lesion id", 20) +
            _filter_fields(q) + " " + _space_field(q) + " <button type='submit'>Search</button></form>")


def new_lesion_form() -> str:
    return ("<fieldset><legend>Or a new lesion</legend><form method='post' action='/' enctype='multipart/form-data'>"
            "<label>Image <input type='file' name='image'></label> <label>Mask <input type='file' name='mask'>"
            "</label><small>NIfTI, NRRD or MetaImage</small><br><label>or image path <input name='image_path' "
            "size='40'></label> <label>mask path <input name='mask_path' size='40'></label> <small>files or DICOM "
            "folders under the archive roots</small><br>" + _field({}, "segment", "Segment") +
            _field({}, "label", "or label", 3) + _field({}, "modality", "Modality", 6) + _field({}, "k", "k", 3) +
            " " + _space_field({}) + " <button type='submit'>Search</button></form></fieldset>")


def save_form(q: Any) -> str:
    hidden = "".join(f"<input type='hidden' name='{n}' value='{html.escape(str(q.get(n)), quote=True)}'>"
                     for n in ("lesion_id", "modality", "date_from", "date_to", "min_volume", "max_volume", "cluster",
                               "space")
                     if q.get(n))
    hidden = hidden.replace("name='lesion_id'", "name='reference_lesion_id'")
    return ("<form method='post' action='/cohorts'>" + hidden +
            "<label>Save as cohort named <input name='name' size='24' pattern='[a-z][a-z0-9_]{0,47}' required></label>"
            " <label>patients <input name='k' size='3' value='20'></label> <label><input type='checkbox' name='replace'"
            " value='1'> replace it if it exists</label> <button type='submit'>Save as cohort"
            "</button> <small>(a Dagster run of the <code>cohort</code> asset: table, outcomes, audit)</small></form>")


def sql_form(sql: str) -> str:
    return ("<form method='post' action='/sql'><textarea name='sql' rows='6'>" + html.escape(sql) + "</textarea><br>"
            "<button type='submit'>Run (read-only)</button> <small>DuckDB SQL over the warehouse tables and "
            "<code>lesion_vectors</code>; writes are refused; every query is audited.</small></form>")


def table_html(columns: list[str], rows: list[list[Any]], n: int) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))[:200]}</td>" for v in r) + "</tr>"
                   for r in rows)
    more = f"<p><small>first {len(rows)} of {n} rows</small></p>" if n > len(rows) else f"<p><small>{n} rows</small></p>"
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def km_svg(outcomes: dict[str, Any], width: int = 420, height: int = 220) -> str:
    """The neighbours' and the rest's Kaplan-Meier curves as an inline SVG, with a legend."""
    groups = [(g, outcomes.get(g) or {}, colour) for g, colour in (("neighbours", "#c33"), ("rest", "#36c"))]
    horizon = max([t for _, o, _ in groups for t, _ in o.get("km", [])] + [1.0])
    left, top, w, h = 40, 10, width - 50, height - 45

    def xy(t: float, s: float) -> str:
        return f"{left + w * t / horizon:.1f},{top + h * (1 - s):.1f}"

    parts = [f"<svg class='km' width='{width}' height='{height}' role='img' aria-label='Kaplan-Meier'>",
             f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#999'/>"]
    for s in (0, 0.5, 1):
        parts.append(f"<text x='{left - 4}' y='{top + h * (1 - s) + 4:.0f}' font-size='10' text-anchor='end'>{s:g}</text>")
    for frac in (0, 0.5, 1):
        parts.append(f"<text x='{left + w * frac:.0f}' y='{top + h + 14}' font-size='10' text-anchor='middle'>"
                     f"{horizon * frac:.0f}</text>")
    parts.append(f"<text x='{left + w / 2:.0f}' y='{height - 4}' font-size='10' text-anchor='middle'>months</text>")
    legend_y = top + 12
    for g, o, colour in groups:
        pts, last = [], 1.0
        for t, s in o.get("km", []):
            pts += [xy(t, last), xy(t, s)]
            last = s
        if pts:
            parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{' '.join(pts)}'/>")
        median = o.get("median_months")
        parts.append(f"<text x='{left + w - 4}' y='{legend_y}' font-size='11' text-anchor='end' fill='{colour}'>"
                     f"{g}: {o.get('patients', 0)} patients, {o.get('events', 0)} events, median "
                     f"{'not reached' if median is None else f'{median:g} mo'}</text>")
        legend_y += 14
    parts.append("</svg>")
    return "".join(parts)


def _distances(r: dict[str, Any]) -> str:
    """``d = 4.21`` (radiomics), with ``deep 0.12`` beside it when the embedding was compared."""
    out = "d = n/a" if r.get("distance") is None else f"d = {r['distance']:.2f}"
    return out + ("" if r.get("deep_distance") is None else f", deep {r['deep_distance']:.2f}")


def results_html(answer: dict[str, Any]) -> str:
    from imaging_assets.features.explain import percentile_words as _pct

    ref = answer["reference"]
    picture = (f"<img class='thumb' src='{html.escape(ref['thumbnail_url'], quote=True)}' alt='reference'><br>"
               if ref.get("thumbnail_url") else "")
    if ref.get("lesion_id"):
        title = f"Reference {html.escape(str(ref.get('lesion_id')))}"
        what = (f"{html.escape(str(ref.get('modality')))} {html.escape(str(ref.get('roi_name')))}, "
                f"{(ref.get('volume_mm3') or 0) / 1000:.1f} cm³, cluster {ref.get('cluster')}")
    else:
        title, what = "Reference: the new lesion", f"feature space {html.escape(str(ref.get('space')))}"
    out = [f"<h2>{title}</h2><p>{picture}{what}</p>"]
    if "outcomes" in answer:
        out.append("<h3>How these patients did</h3>" + km_svg(answer["outcomes"]))
    searched = answer["results"][0].get("search_space") if answer["results"] else None
    how = {"hybrid": "by radiomics features and the deep embedding (rank-fused)", "deep": "by the deep embedding",
           "radiomics": "by radiomics features"}.get(str(searched), "")
    out.append(f"<h2>{len(answer['results'])} closest patients <small>{html.escape(how)}</small></h2>"
               "<table class='results'>"
               "<tr><th>#</th><th>picture</th><th>lesion</th><th>why it is close</th></tr>")
    for r in answer["results"]:
        e = r["explanation"] or {"groups": {}, "agree": [], "differ": []}
        groups = "".join(f"<div>{html.escape(g)} <span class='bar' style='width:{s * 150:.0f}px'></span> {s:.0%}</div>"
                         for g, s in sorted(e["groups"].items(), key=lambda kv: -kv[1]) if s >= 0.01)

        def items(key: str, e: dict = e) -> str:
            return "".join(
                f"<li>{html.escape(c['name'])}: {_pct(c['reference_percentile'])} vs {_pct(c['neighbour_percentile'])}</li>"
                for c in e[key][:3])

        out.append(
            f"<tr class='result'><td>{r['rank']}</td><td><img class='thumb' src='{html.escape(r['thumbnail_url'], quote=True)}' "
            f"alt='lesion {html.escape(r['lesion_id'])}'></td><td><code>{html.escape(r['lesion_id'])}</code><br>"
            f"{_distances(r)}<br>{html.escape(str(r.get('modality')))} {html.escape(str(r.get('roi_name')))}<br>"
            f"{(r.get('volume_mm3') or 0) / 1000:.1f} cm³, cluster {r.get('cluster')}<br>"
            f"<small>{html.escape(str(r.get('patient_key')))}</small></td><td class='why'>{groups}<b>agree</b><ul>"
            f"{items('agree')}</ul><b>differ</b><ul>{items('differ')}</ul></td></tr>")
    out.append("</table>")
    return "".join(out)
