"""Users, roles and tokens (imaging_assets.access) and the ``imaging-assets users`` commands."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imaging_assets import access, settings
from imaging_assets.cli import main
from imaging_assets.errors import AccessError, UnknownUserError, UserExistsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def users(tmp_path: Path) -> Path:
    return tmp_path / "auth" / "users.json"


def test_token_is_returned_once_and_only_its_hash_is_stored(users: Path) -> None:
    token = access.add_user("alice", "analyst", users)
    assert token.startswith(access.TOKEN_PREFIX) and len(token) >= 40
    text = users.read_text()
    assert token not in text and token[len(access.TOKEN_PREFIX):] not in text
    assert access.token_hash(token) in text
    assert json.loads(text)["users"][0].keys() == {"name", "role", "created_at", "token_sha256"}
    # a second token is a fresh random value, and the lock file holds nothing
    other = access.add_user("bob", "viewer", users)
    assert other != token and other not in users.read_text() and token not in users.read_text()
    assert users.with_name("users.json.lock").read_bytes() == b""


def test_list_users_never_shows_hashes(users: Path) -> None:
    access.add_user("bob", "viewer", users)
    access.add_user("alice", "admin", users)
    listed = access.list_users(users)
    assert [u["name"] for u in listed] == ["alice", "bob"]
    assert all(u.keys() == {"name", "role", "created_at"} for u in listed)
    assert listed[0]["role"] == "admin" and listed[0]["created_at"].endswith("Z")
    assert access.list_users(users.parent / "absent.json") == []


def test_authenticate_right_wrong_and_removed_token(users: Path) -> None:
    token = access.add_user("alice", "analyst", users)
    bob = access.add_user("bob", "viewer", users)
    user = access.authenticate(token, users)
    assert user is not None and (user.name, user.role) == ("alice", "analyst")
    assert access.authenticate(bob, users).name == "bob"
    assert access.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B"), users) is None
    for bad in ("", None, "ia_", access.token_hash(token), "x" * 10_000, 42):
        assert access.authenticate(bad, users) is None  # the stored hash itself is no token either
    access.remove_user("alice", users)
    assert access.authenticate(token, users) is None
    assert access.authenticate(bob, users).name == "bob"
    with pytest.raises(UnknownUserError, match="alice"):
        access.remove_user("alice", users)


def test_duplicate_refused_unless_replaced(users: Path) -> None:
    old = access.add_user("alice", "viewer", users)
    with pytest.raises(UserExistsError, match="replace"):
        access.add_user("alice", "admin", users)
    assert access.authenticate(old, users).role == "viewer"
    new = access.add_user("alice", "admin", users, replace=True)
    assert access.authenticate(old, users) is None  # the old token is revoked with the replace
    assert access.authenticate(new, users).role == "admin"
    assert [u["name"] for u in access.list_users(users)] == ["alice"]


@pytest.mark.parametrize("name", ["", "Alice", "a b", "a/b", "ä", "x" * 65, "../etc"])
def test_invalid_names_are_refused(users: Path, name: str) -> None:
    with pytest.raises(AccessError, match="invalid user name"):
        access.add_user(name, "viewer", users)
    assert not users.exists()


def test_unknown_role_is_refused(users: Path) -> None:
    with pytest.raises(AccessError, match="roles: viewer, analyst, admin"):
        access.add_user("alice", "superuser", users)


def test_roles_permissions(users: Path) -> None:
    expected = {
        "viewer": {"search", "view"},
        "analyst": {"search", "view", "save_cohort", "sql"},
        "admin": {"search", "view", "save_cohort", "sql", "admin"},
    }
    for role, allowed in expected.items():
        user = access.authenticate(access.add_user(role, role, users), users)
        assert {p for p in access.PERMISSIONS if user.can(p)} == allowed, role
    assert (access.SEARCH, access.VIEW, access.SAVE_COHORT, access.SQL, access.ADMIN) == access.PERMISSIONS
    with pytest.raises(AccessError, match="unknown permission"):
        access.User("a", "admin").can("delete_everything")


def test_file_is_private_and_replaced_atomically(users: Path) -> None:
    access.add_user("alice", "viewer", users)
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    first = users.stat().st_ino
    access.add_user("bob", "viewer", users)
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert users.stat().st_ino != first  # a new file renamed over the old one, not rewritten in place
    assert stat.S_IMODE(users.with_name("users.json.lock").stat().st_mode) == 0o600
    assert sorted(p.name for p in users.parent.iterdir()) == ["users.json", "users.json.lock"]  # no temp left


def test_unreadable_file_is_an_access_error(users: Path) -> None:
    users.parent.mkdir(parents=True)
    users.write_text("{not json")
    with pytest.raises(AccessError, match="cannot be read"):
        access.list_users(users)
    users.write_text('{"users": [{"name": "x"}]}')
    with pytest.raises(AccessError, match="not a users file"):
        access.authenticate("ia_x", users)


_ADDER = """
import sys
from imaging_assets import access
path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    access.add_user(f"{prefix}{i}", "viewer", path)
"""


def test_concurrent_adds_lose_no_user(users: Path) -> None:
    """Processes adding users to the same file at once: every user is there at the end (the flock)."""
    n, procs = 12, 3
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    running = [subprocess.Popen([sys.executable, "-c", _ADDER, str(users), f"p{j}-", str(n)], env=env)
               for j in range(procs)]
    assert [p.wait(timeout=120) for p in running] == [0] * procs
    names = {u["name"] for u in access.list_users(users)}
    assert names == {f"p{j}-{i}" for j in range(procs) for i in range(n)}


def test_users_file_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAGING_ASSETS_USERS", raising=False)
    monkeypatch.setenv("IMAGING_ASSETS_WAREHOUSE", str(tmp_path / "wh"))
    assert settings.users_file() == tmp_path / "wh" / "users.json"
    monkeypatch.setenv("IMAGING_ASSETS_USERS", str(tmp_path / "elsewhere.json"))
    assert settings.users_file() == tmp_path / "elsewhere.json"
    token = access.add_user("alice", "viewer")
    assert access.authenticate(token).name == "alice"
    assert (tmp_path / "elsewhere.json").exists() and not (tmp_path / "wh").exists()


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_add_prints_the_token_as_last_line(users: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "IMAGING_ASSETS_USERS": str(users)}
    out = subprocess.run([sys.executable, "-m", "imaging_assets.cli", "users", "add", "alice", "--role", "analyst"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    token = out.stdout.strip().splitlines()[-1]
    assert out.stdout.strip() == token  # stdout is the token alone: TOKEN=$(imaging-assets users add ...)
    assert "shown this once" in out.stderr and token not in out.stderr
    assert access.authenticate(token, users).role == "analyst"
    assert token not in users.read_text()


def test_cli_list_and_remove(users: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["users", "--file", str(users), "add", "bob", "--role", "viewer"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["users", "add", "alice", "--role", "admin", "--file", str(users)]) == 0
    capsys.readouterr()
    assert main(["users", "list", "--file", str(users)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "role", "created_at"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["alice", "admin"], ["bob", "viewer"]]
    assert token not in "\n".join(lines) and access.token_hash(token) not in "\n".join(lines)
    assert main(["users", "remove", "bob", "--file", str(users)]) == 0
    assert "removed user bob" in capsys.readouterr().out
    assert access.authenticate(token, users) is None
    assert main(["users", "list", "--json", "--file", str(users)]) == 0
    assert [u["name"] for u in json.loads(capsys.readouterr().out)] == ["alice"]


@pytest.mark.parametrize("argv, message", [
    (["add", "alice", "--role", "boss"], "unknown role 'boss'"),
    (["add", "Alice!", "--role", "viewer"], "invalid user name"),
    (["remove", "nobody"], "no user 'nobody'"),
])
def test_cli_errors_exit_2(users: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert main(["users", "--file", str(users), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_duplicate_exits_2(users: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["users", "--file", str(users), "add", "alice", "--role", "viewer"]) == 0
    assert main(["users", "--file", str(users), "add", "alice", "--role", "viewer"]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["users", "--file", str(users), "add", "alice", "--role", "admin", "--replace"]) == 0
    assert access.list_users(users)[0]["role"] == "admin"
