"""Value-representation checks of the coded values the catalog stores (pure code, no pydicom needed).

A UID or a coded string is an identifier of a *thing* (an instance, a series, a modality), never of a
person; a crafted or mis-mapped file can still carry a medical record number in ``SeriesInstanceUID`` or a
patient name in ``Modality``. Such values must not be catalogued verbatim, so discovery checks them against
their DICOM value representation (PS3.5 §6.2, §9.1) and quarantines a file that violates it with a reason
that names the tag and the kind of problem, **never the value**:

* ``UI`` (unique identifier): components of digits separated by ``.``, no empty component, no leading zero
  in a component of more than one digit, at most 64 characters;
* ``CS`` (code string): upper-case letters, digits, space and ``_``, at most 16 characters (leading and
  trailing spaces are padding and ignored); one value (the tags checked here are single-valued).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CS_RE = re.compile(r"^[A-Z0-9 _]*$")
UID_MAX = 64
CS_MAX = 16


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a DICOM UID (the kind of problem, never the value), or None when it is one."""
    if len(value) > UID_MAX:
        return f"longer than {UID_MAX} characters"
    if _UID_RE.match(value):
        return None
    if not set(value) <= set("0123456789."):
        return "holds characters other than digits and dots"
    if "" in value.split("."):
        return "has an empty component"
    return "a component has a leading zero"


def cs_problem(value: str) -> str | None:
    """Why ``value`` is not a single DICOM code string (CS), or None when it is one."""
    text = value.strip(" ")
    if "\\" in text:
        return "holds more than one value"
    if len(text) > CS_MAX:
        return f"longer than {CS_MAX} characters"
    if not _CS_RE.match(text):
        return "holds characters other than upper-case letters, digits, space and underscore"
    return None


def coded_value_problems(values: Mapping[str, object], uid_tags: Iterable[str], cs_tags: Iterable[str],
                         names: Mapping[str, str] | None = None) -> list[str]:
    """One sentence per tag of ``values`` whose value violates its VR (tags absent or None are skipped).

    Parameters
    ----------
    values
        Keyword -> value as read (a string, or a list of strings for multi-valued UID tags).
    uid_tags, cs_tags
        The keywords to check as UI and as CS.
    names
        Keyword -> how to name it in the sentence (e.g. ``"Series Instance UID (0020,000E)"``).
    """
    names = names or {}
    out = []
    for kind, tags, check in (("DICOM UID", uid_tags, uid_problem), ("code string (CS)", cs_tags, cs_problem)):
        for kw in tags:
            raw = values.get(kw)
            if raw is None:
                continue
            for v in (raw if isinstance(raw, (list, tuple)) else [raw]):
                problem = check(str(v)) if v is not None else None
                if problem:
                    out.append(f"{names.get(kw, kw)} is not a valid {kind}: {problem} (value not shown)")
                    break
    return out
