"""Keyed pseudonymisation of patient identifiers.

The patient key is ``HMAC-SHA256(secret, PatientID)`` truncated to 24 hex characters. The secret comes
from the environment variable ``IMAGING_ASSETS_PSEUDONYM_KEY``. Without it a documented development
default is used and a loud warning is logged once: fine for the synthetic demo, never for real data.
Discovery and the outcomes loader both call :func:`patient_key`, so outcomes join to images.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

logger = logging.getLogger(__name__)

ENV_VAR = "IMAGING_ASSETS_PSEUDONYM_KEY"
DEV_DEFAULT_KEY = "imaging-assets-development-key-NOT-FOR-REAL-DATA"
_warned = False


def pseudonym_secret(explicit: str | None = None) -> str:
    """Return the pseudonymisation secret.

    Parameters
    ----------
    explicit
        A secret passed by the caller (e.g. a Dagster resource field); wins over the environment.

    Returns
    -------
    str
        The secret. Falls back to :data:`DEV_DEFAULT_KEY` with a warning when nothing is configured.
    """
    global _warned
    secret = explicit or os.environ.get(ENV_VAR)
    if secret:
        return secret
    if not _warned:
        logger.warning(
            "%s is not set: using the development default pseudonymisation key. "
            "Patient keys are NOT secret; set %s before processing real patient data.",
            ENV_VAR,
            ENV_VAR,
        )
        _warned = True
    return DEV_DEFAULT_KEY


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
    digest = hmac.new(pseudonym_secret(secret).encode(), pid.encode("utf-8"), hashlib.sha256).hexdigest()
    return "pk_" + digest[:24]
