"""Helpers that shape asset metadata for the UI (no definitions here)."""


def md_table(rows: list[dict], columns: list[str], limit: int = 20) -> str:
    """A markdown table of the first ``limit`` rows (for asset metadata)."""
    if not rows:
        return "_none_"
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join(
        "| " + " | ".join(str(r.get(c, "")).replace("|", "/").replace("\n", " ") for c in columns) + " |\n"
        for r in rows[:limit]
    )
    more = f"\n_{len(rows) - limit} more not shown_" if len(rows) > limit else ""
    return head + body + more


def png_markdown(path, alt: str = "plot") -> str:
    """Markdown that shows a PNG inline in the Dagster UI (data URI), or a note when there is none."""
    import base64
    from pathlib import Path

    if path is None or not Path(path).is_file():
        return "_no plot (not enough data)_"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
