"""Every exception the project raises on purpose, in one module (as pydicom's ``errors.py``).

Each is a subclass of the built-in a caller would catch anyway (``ValueError`` for bad input,
``RuntimeError`` for a state that needs an earlier step), and every message names the file, lesion or
table concerned and what to do about it. No imports: any package may use these.
"""

from __future__ import annotations


class LesionError(ValueError):
    """The lesion cannot be extracted (label absent, empty mask, single voxel, ...)."""


class SegmentationReadError(ValueError):
    """A segmentation file could not be read or is not a usable SEG/RTSTRUCT; the message says why."""


class DicomRootsMissingError(FileNotFoundError):
    """No configured DICOM root exists (or none is configured): discovery stops and leaves the catalog as
    it was, so a mistyped or unmounted root cannot look like "every file was removed"."""


class OutcomeFileError(ValueError):
    """An outcome file that cannot be read as a table with the required columns."""


class PseudonymKeyError(ValueError):
    """No usable pseudonymisation key (a public key, or a key file that is unsafe, empty or unreadable), or a
    key that is not the one the warehouse was built with (:class:`PseudonymKeyMismatch`)."""


class PseudonymKeyMismatch(PseudonymKeyError):
    """The configured key's fingerprint differs from the one stored in the warehouse: using it would give
    the same patients new keys (outcomes and images would no longer join). Nothing was written."""


class QueryRefused(ValueError):
    """The statement is not a read-only query, or it reaches outside the warehouse."""


class NoRobustSetError(RuntimeError):
    """Vectors were requested before a robust feature set exists (materialize ``robust_feature_set``)."""


class VectorStoreIntegrityError(RuntimeError):
    """A vector write did not leave the Lance table holding exactly the rows it was asked to hold."""


class MaskGeometryError(LesionError):
    """A mask's geometry does not belong to its image (another scan, rotated, or lying outside it).

    Raised by :func:`imaging_assets.features.lesions.check_mask_geometry`; the message names the mask and
    the image and says what differs. Callers opt into resampling such a mask with ``resample_mask=True``.
    """


class AccessError(ValueError):
    """Users and tokens (:mod:`imaging_assets.access`): a bad user name, unknown role or permission, or a users
    file that cannot be read; the message names the file or value and what is accepted."""


class UnknownUserError(AccessError):
    """No user of that name in the users file (the message names the file and the users it holds)."""


class UserExistsError(AccessError):
    """A user of that name exists already: pass ``replace=True`` (CLI ``--replace``) to issue a new token."""


def error_text(exc: BaseException, limit: int = 240) -> str:
    """``"<ExceptionType>: <message>"`` for a stored reason, with every quoted part of a library's message
    (``'...'`` / ``"..."``, where pydicom, SimpleITK and Python put the offending value) replaced by ``'…'``:
    a header value or a file's content may be PHI, and reasons are stored in analytic tables."""
    import re

    text = re.sub(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"", "'…'", str(exc))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
