"""Users, roles and access tokens (for the web server; no Dagster, no warehouse access here).

The users live in one JSON file, :func:`imaging_assets.settings.users_file` (``IMAGING_ASSETS_USERS``, else
``<warehouse>/users.json``)::

    {"version": 1, "users": [{"name": "alice", "role": "analyst", "created_at": "2026-12-01T21:30:00Z",
                              "token_sha256": "9f86d0..."}]}

Tokens
    :func:`add_user` makes a token of 32 random bytes (``secrets.token_urlsafe``, 256 bits, prefixed
    ``ia_``), returns it once and stores only its SHA-256. A slow, salted KDF (scrypt, PBKDF2) protects
    *guessable* secrets such as passwords; a 256-bit random token cannot be guessed or looked up in a
    table, so one SHA-256 is as safe for it, and :func:`authenticate` stays a microsecond hash per request
    instead of ~50 ms of scrypt (which a web server would pay on every call). Hashes are compared with
    :func:`hmac.compare_digest`, against every user (no early exit on the first match).

The file
    Written atomically (a temporary file in the same folder, ``fsync``, :func:`os.replace`) with mode
    0600; every read-modify-write (:func:`add_user`, :func:`remove_user`) holds an exclusive
    :func:`fcntl.flock` on ``<file>.lock``, so concurrent commands do not lose each other's users.
    Readers need no lock (a replace is atomic); they read the file on every call.

Roles (:data:`ROLES`)
    ``viewer``: search and view; ``analyst``: viewer + save cohorts + read-only SQL; ``admin``: everything,
    user management included. Permissions are the constants :data:`SEARCH`, :data:`VIEW`,
    :data:`SAVE_COHORT`, :data:`SQL`, :data:`ADMIN`; :meth:`User.can` answers for one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging_assets import settings
from imaging_assets.errors import AccessError, UnknownUserError, UserExistsError

#: Permissions, as :meth:`User.can` takes them.
SEARCH = "search"
VIEW = "view"
SAVE_COHORT = "save_cohort"
SQL = "sql"
ADMIN = "admin"
PERMISSIONS: tuple[str, ...] = (SEARCH, VIEW, SAVE_COHORT, SQL, ADMIN)

#: What each role may do (``admin``: everything, managing users included).
ROLES: dict[str, frozenset[str]] = {
    "viewer": frozenset({SEARCH, VIEW}),
    "analyst": frozenset({SEARCH, VIEW, SAVE_COHORT, SQL}),
    "admin": frozenset(PERMISSIONS),
}

#: A user name: 1 to 64 of lower-case letters, digits, ``.``, ``_`` and ``-``.
NAME_PATTERN = re.compile(r"[a-z0-9._-]{1,64}")
TOKEN_PREFIX = "ia_"
FILE_VERSION = 1
_MAX_TOKEN_CHARS = 256  # longer input is no token of ours: refused before hashing


@dataclass(frozen=True)
class User:
    """An authenticated user: name, role, and what the role may do (:meth:`can`)."""

    name: str
    role: str
    created_at: str | None = None

    @property
    def permissions(self) -> frozenset[str]:
        """The permissions of the user's role."""
        return ROLES.get(self.role, frozenset())

    def can(self, permission: str) -> bool:
        """Whether the user's role grants ``permission`` (one of :data:`PERMISSIONS`).

        Raises
        ------
        AccessError
            ``permission`` is not one of :data:`PERMISSIONS` (a typo would otherwise deny silently).
        """
        if permission not in PERMISSIONS:
            raise AccessError(f"unknown permission {permission!r}; permissions: {', '.join(PERMISSIONS)}")
        return permission in self.permissions


def _path(path: str | os.PathLike[str] | None) -> Path:
    return Path(path) if path is not None else settings.users_file()


def check_name(name: str) -> str:
    """``name`` when it is a valid user name (:data:`NAME_PATTERN`), else :class:`AccessError`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AccessError(f"invalid user name {name!r}: use 1 to 64 of a-z, 0-9, '.', '_' and '-'")
    return name


def check_role(role: str) -> str:
    """``role`` when it is one of :data:`ROLES`, else :class:`AccessError` listing them."""
    if role not in ROLES:
        raise AccessError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return role


def token_hash(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------- the file
def _read(path: Path) -> list[dict[str, Any]]:
    """The user records of the file ([] when it does not exist). Read on every call (a few kB: tens of µs),
    so a removed user or a new token counts from the next request on, with no cache to go stale."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise AccessError(f"users file {path} cannot be read: {exc}") from exc
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, list) or not all(isinstance(u, dict) and {"name", "role", "token_sha256"} <= u.keys()
                                              for u in users):
        raise AccessError(f"users file {path} is not a users file (expected {{\"users\": [{{name, role, "
                          "token_sha256, created_at}, ...]})")
    return users


def _write(path: Path, users: list[dict[str, Any]]) -> None:
    """Replace the file atomically: a 0600 temporary file in the same folder, fsync, :func:`os.replace`."""
    doc = {"version": FILE_VERSION, "users": sorted(users, key=lambda u: u["name"])}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@contextmanager
def _locked(path: Path) -> Iterator[list[dict[str, Any]]]:
    """Hold the exclusive lock of the users file (``<file>.lock``) and yield its current records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield [dict(u) for u in _read(path)]
    finally:
        os.close(fd)  # closing the descriptor releases the lock (the lock file stays: removing it would race)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------- API
def add_user(name: str, role: str, path: str | os.PathLike[str] | None = None, replace: bool = False) -> str:
    """Add a user (or, with ``replace``, re-issue one's token and role) and return the new token.

    The token is returned once and never stored: keep it (the file holds only its SHA-256).

    Raises
    ------
    AccessError
        Invalid name or unknown role.
    UserExistsError
        The name exists and ``replace`` is False.
    """
    check_name(name)
    check_role(role)
    target = _path(path)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _locked(target) as users:
        if any(u["name"] == name for u in users) and not replace:
            raise UserExistsError(f"user {name!r} exists already in {target}; replace it (replace=True, "
                                  "CLI --replace) to issue a new token")
        users = [u for u in users if u["name"] != name]
        users.append({"name": name, "role": role, "created_at": _now(), "token_sha256": token_hash(token)})
        _write(target, users)
    return token


def remove_user(name: str, path: str | os.PathLike[str] | None = None) -> None:
    """Remove a user: their token stops authenticating at once.

    Raises
    ------
    UnknownUserError
        No such user in the file.
    """
    target = _path(path)
    with _locked(target) as users:
        kept = [u for u in users if u["name"] != name]
        if len(kept) == len(users):
            known = ", ".join(sorted(u["name"] for u in users)) or "none"
            raise UnknownUserError(f"no user {name!r} in {target} (users: {known})")
        _write(target, kept)


def list_users(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The users as ``{"name", "role", "created_at"}`` dicts sorted by name (no hashes)."""
    return [{"name": u["name"], "role": u["role"], "created_at": u.get("created_at")}
            for u in sorted(_read(_path(path)), key=lambda u: u["name"])]


def authenticate(token: str | None, path: str | os.PathLike[str] | None = None) -> User | None:
    """The :class:`User` a token belongs to, or None (no such token, a removed user, or not a token)."""
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
        return None
    digest = token_hash(token).encode("ascii")
    found = None
    for u in _read(_path(path)):  # every user is compared (no early exit), each in constant time
        if hmac.compare_digest(digest, str(u["token_sha256"]).encode("utf-8")) and found is None:
            found = u
    if found is None or found["role"] not in ROLES:
        return None
    return User(found["name"], found["role"], found.get("created_at"))
