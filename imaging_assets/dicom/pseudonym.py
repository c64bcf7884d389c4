"""Keyed pseudonymisation of patient identifiers, and the key it needs.

The patient key is ``HMAC-SHA256(secret, PatientID)`` truncated to 24 hex characters. There is **no
built-in key**: a public default would make every pseudonym reversible (a brute force over an MRN pattern
takes seconds). The secret comes from, in this order:

1. an explicit secret passed by the caller (tests, :func:`imaging_assets.stages.keys.rekey`);
2. the environment variable ``IMAGING_ASSETS_PSEUDONYM_KEY`` (``make demo`` and the test suite set an
   explicit demo/test key there; a hospital sets its own secret);
3. the installation's key file (``IMAGING_ASSETS_PSEUDONYM_KEY_FILE``, default
   ``~/.config/imaging_assets/pseudonym.key``, see :func:`imaging_assets.settings.pseudonym_key_file`):
   created on first use with 32 random bytes (``secrets.token_hex``), owner-only (mode 0600, its folder
   0700); a key file that group or others may read, or an empty one, is refused.

The secret never goes into a Dagster config field, run config or a table. What the warehouse stores is its
:func:`key_fingerprint` (an HMAC of a fixed label), so a pipeline run with another key is refused instead
of silently giving the same patients new keys (:mod:`imaging_assets.stages.keys`).
Discovery and the outcomes loader both call :func:`patient_key`, so outcomes join to images.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets as _secrets
import stat
from pathlib import Path

from imaging_assets import settings
from imaging_assets.errors import PseudonymKeyError

logger = logging.getLogger(__name__)

ENV_VAR = "IMAGING_ASSETS_PSEUDONYM_KEY"
#: The secret ``make demo`` sets in :data:`ENV_VAR` for the synthetic demo cohort (never for real data).
DEMO_KEY = "imaging-assets-demo-key-for-synthetic-data-only"
#: Keys that are public and so refused as a configured key: the development default earlier versions used
#: silently when nothing was configured. (Accepted only as the *old* key of ``imaging-assets rekey``.)
PUBLIC_KEYS = frozenset({"imaging-assets-development-key-NOT-FOR-REAL-DATA"})
#: The fixed label whose HMAC is the key fingerprint stored in the warehouse.
FINGERPRINT_LABEL = b"imaging-assets pseudonym key fingerprint v1"


def read_key_file(path: Path) -> str:
    """The secret of an existing key file, refusing one others may read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise PseudonymKeyError(f"pseudonymisation key file {path}: cannot stat it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PseudonymKeyError(f"pseudonymisation key file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise PseudonymKeyError(
            f"pseudonymisation key file {path}: readable or writable by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); make it owner-only with `chmod 600 {path}`")
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PseudonymKeyError(f"pseudonymisation key file {path}: cannot read it ({exc})") from None
    if not secret:
        raise PseudonymKeyError(f"pseudonymisation key file {path}: empty (delete it to have a new key made, "
                                "or restore the key it held)")
    return secret


def _create_key_file(path: Path) -> str:
    """Write a new random key, owner-only; a file made meanwhile by another process wins (O_EXCL)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = _secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key_file(path)
    except OSError as exc:
        raise PseudonymKeyError(f"pseudonymisation key file {path}: cannot create it ({exc.strerror}); set "
                                f"{ENV_VAR} or IMAGING_ASSETS_PSEUDONYM_KEY_FILE") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)  # whatever the umask
    logger.warning("created a new pseudonymisation key file %s (owner-only). Keep it secret and back it up: "
                   "patient keys can only be re-derived with it", path)
    return secret


def pseudonym_secret(explicit: str | None = None) -> str:
    """Return the pseudonymisation secret (see the module docstring for where it comes from).

    Parameters
    ----------
    explicit
        A secret passed by the caller; wins over the environment and the key file.

    Returns
    -------
    str
        The secret.

    Raises
    ------
    PseudonymKeyError
        A public key is configured, or the key file is unsafe (group/others may read it), empty or cannot
        be read or created.
    """
    secret = explicit or os.environ.get(ENV_VAR)
    if not secret:
        path = settings.pseudonym_key_file()
        secret = read_key_file(path) if os.path.lexists(path) else _create_key_file(path)
    if secret in PUBLIC_KEYS:
        raise PseudonymKeyError(
            "the configured pseudonymisation key is the public development key of earlier versions: patient "
            f"keys made with it can be reversed. Unset {ENV_VAR} (a random per-installation key file is then "
            f"used) or set a secret of your own; `imaging-assets rekey` moves a warehouse built with it")
    return secret


def key_fingerprint(secret: str) -> str:
    """A fingerprint of the key (HMAC-SHA256 of :data:`FINGERPRINT_LABEL`, 32 hex characters): says whether
    two keys are the same without revealing either, and cannot be used to compute patient keys."""
    return hmac.new(secret.encode(), FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:32]


def patient_key(patient_id: str | None, secret: str | None = None) -> str | None:
    """Pseudonymise a raw PatientID with a keyed HMAC.

    Parameters
    ----------
    patient_id
        The raw DICOM PatientID (or the outcomes table's patient id). Surrounding whitespace is ignored,
        so ``"P001 "`` (DICOM pads odd lengths) and ``"P001"`` map to the same key.
    secret
        The secret; see :func:`pseudonym_secret`.

    Returns
    -------
    str or None
        ``"pk_"`` followed by 24 hex characters, or None when ``patient_id`` is empty/missing.
    """
    if patient_id is None:
        return None
    pid = str(patient_id).strip()
    if not pid:
        return None
    # an explicit secret is used as given (``rekey`` derives the old keys with a retired, possibly public key);
    # the pipeline's steps pass the secret :func:`pseudonym_secret` / ``stages.keys.check_key`` resolved
    key = secret or pseudonym_secret()
    digest = hmac.new(key.encode(), pid.encode("utf-8"), hashlib.sha256).hexdigest()
    return "pk_" + digest[:24]
