"""The Kubernetes deployment (deploy/Dockerfile, deploy/helm/*.yaml) agrees with the code and with itself.

No cluster is needed: the manifests are parsed and cross-checked (names, variables, mounts, the module the
servers load, the image's user and set-up); what the chart renders from them is not checked here.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / "deploy" / "helm"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
MODULE = "imaging_assets.definitions"
SECRET_ONLY = "IMAGING_ASSETS_PSEUDONYM_KEY"
README_LINES = (
    "docker build -f deploy/Dockerfile -t imaging-assets:local .",
    "helm upgrade --install dagster dagster/dagster -f deploy/helm/values.yaml",
)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((HELM / name).read_text()) if d is not None]


@pytest.fixture(scope="module")
def values() -> dict:
    (doc,) = _docs("values.yaml")
    return doc


@pytest.fixture(scope="module")
def user_deployment(values) -> dict:
    section = values["dagster-user-deployments"]
    assert section["enabled"] is True
    (deployment,) = section["deployments"]
    return deployment


@pytest.fixture(scope="module")
def launcher(values) -> dict:
    return values["runLauncher"]["config"]["k8sRunLauncher"]


def _user_env(deployment: dict) -> dict[str, str]:
    env = deployment.get("env") or {}
    if isinstance(env, list):  # the chart accepts a list of {name, value} as well
        return {e["name"]: str(e["value"]) for e in env if "value" in e}
    return {k: str(v) for k, v in env.items()}


def _launcher_env(launcher: dict) -> dict[str, str]:
    out = {}
    for item in launcher.get("envVars") or []:
        name, sep, value = item.partition("=")
        assert sep, f"run launcher envVars {item!r}: give NAME=VALUE (a bare NAME copies the daemon's value)"
        out[name] = value
    return out


def _secret_names(refs) -> list[str]:
    return [r["name"] for r in refs or []]


def _secrets() -> dict[str, dict]:
    docs = _docs("secret.example.yaml")
    assert all(d["kind"] == "Secret" for d in docs)
    return {d["metadata"]["name"]: d for d in docs}


def _package_source() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "imaging_assets").rglob("*.py")))


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.partition(" ")
        lines.append((instr.upper(), args.strip()))
        current = ""
    return lines


def test_every_helm_manifest_parses():
    files = sorted(HELM.glob("*.yaml"))
    assert {f.name for f in files} >= {"values.yaml", "pvc.yaml", "secret.example.yaml"}
    for f in files:
        docs = _docs(f.name)
        assert docs, f"{f} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{f}: every document must be a mapping"


def test_runs_use_the_k8s_run_launcher_and_the_user_code_loads_the_definitions(values, user_deployment):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    image = user_deployment["image"]
    assert image["repository"] and str(image["tag"]), "user deployment image repository and tag must be set"
    assert str(image["tag"]) != "latest", "a fixed tag keeps a run and its retries on one image"
    args = user_deployment["dagsterApiGrpcArgs"]
    assert "-m" in args and args[args.index("-m") + 1] == MODULE
    assert user_deployment["port"] == 3030
    module_file = REPO / (MODULE.replace(".", "/") + ".py")
    assert module_file.is_file()
    text = module_file.read_text()
    assert "@dg.definitions" in text and re.search(r"^def defs\(", text, re.M)


def test_every_imaging_assets_variable_is_one_the_code_reads(user_deployment, launcher):
    source = _package_source()
    names = set(_user_env(user_deployment)) | set(_launcher_env(launcher))
    for secret in _secrets().values():
        names |= set(secret.get("stringData") or {})
    names = {n for n in names if n.startswith("IMAGING_ASSETS_")}
    assert {"IMAGING_ASSETS_WAREHOUSE", "IMAGING_ASSETS_DICOM_ROOTS", SECRET_ONLY} <= names
    unread = sorted(n for n in names if not re.search(rf"\b{n}\b", source))
    assert not unread, f"set by the deployment but read nowhere in imaging_assets/: {unread}"


def test_user_code_and_runs_get_the_same_settings(user_deployment, launcher):
    assert _user_env(user_deployment) == _launcher_env(launcher)
    assert _secret_names(user_deployment.get("envSecrets")) == _secret_names(launcher.get("envSecrets"))
    assert user_deployment["volumes"] == launcher["volumes"]
    assert user_deployment["volumeMounts"] == launcher["volumeMounts"]


def test_the_pseudonym_key_comes_only_from_a_secret(user_deployment, launcher):
    assert SECRET_ONLY not in _user_env(user_deployment)
    assert SECRET_ONLY not in _launcher_env(launcher)
    assert SECRET_ONLY not in json.dumps(user_deployment.get("env")), "the key must not be a plain value"
    secrets = _secrets()
    for where, refs in (("user deployment", user_deployment.get("envSecrets")), ("run launcher", launcher.get("envSecrets"))):
        names = _secret_names(refs)
        assert names, f"{where}: no envSecrets"
        assert any(SECRET_ONLY in (secrets.get(n, {}).get("stringData") or {}) for n in names), (
            f"{where}: none of the Secrets {names} supplies {SECRET_ONLY}"
        )


def test_secret_names_match_the_example_secret(values, user_deployment, launcher):
    secrets = _secrets()
    for name in _secret_names(user_deployment.get("envSecrets")) + _secret_names(launcher.get("envSecrets")):
        assert name in secrets, f"envSecrets names {name!r}, secret.example.yaml defines {sorted(secrets)}"
    if not values["postgresql"]["enabled"] and not values.get("generatePostgresqlPasswordSecret", True):
        pg_secret = values.get("global", {}).get("postgresqlSecretName", "dagster-postgresql-secret")
        assert "postgresql-password" in (secrets[pg_secret].get("stringData") or {})


def test_claims_match_pvc_yaml_and_mounts_match_the_variables(user_deployment, launcher):
    pvcs = {d["metadata"]["name"]: d for d in _docs("pvc.yaml")}
    assert all(d["kind"] == "PersistentVolumeClaim" for d in pvcs.values())
    assert pvcs["imaging-assets-warehouse"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in (user_deployment, launcher):
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()}
        assert claims == set(pvcs), f"claims {claims} != PVCs {set(pvcs)}"
        mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
        for m in mounts.values():
            assert m["name"] in volumes
        env = _user_env(user_deployment)
        warehouse = mounts[env["IMAGING_ASSETS_WAREHOUSE"]]
        assert volumes[warehouse["name"]]["persistentVolumeClaim"]["claimName"] == "imaging-assets-warehouse"
        assert not warehouse.get("readOnly"), "the warehouse is written by the runs"
        for root in env["IMAGING_ASSETS_DICOM_ROOTS"].split(":"):
            dicom = mounts[root]
            assert volumes[dicom["name"]]["persistentVolumeClaim"]["claimName"] == "imaging-assets-dicom"
            assert dicom.get("readOnly") is True, "the archive is mounted read-only"
        if "IMAGING_ASSETS_OUTCOMES" in env:
            assert env["IMAGING_ASSETS_OUTCOMES"] in mounts


def test_the_extraction_tag_limit_names_a_tag_the_code_sets(values):
    limits = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    source = _package_source()
    for limit in limits:
        assert limit["key"] in source, f"tag {limit['key']!r} is set nowhere in imaging_assets/"
        assert str(limit["value"]) in source
    assert "duckdb_writer" in source and values["concurrency"]["pools"]["defaultLimit"] == 1


def test_dockerfile_installs_as_a_non_root_user_with_the_readme_setup():
    instructions = _dockerfile()
    users = [(i, args) for i, (instr, args) in enumerate(instructions) if instr == "USER"]
    installs = [i for i, (instr, args) in enumerate(instructions) if instr == "RUN" and args == "make install"]
    assert installs, "the image must be set up with `RUN make install`"
    before = [args for i, args in users if i < installs[0]]
    assert before and before[-1].split(":")[0] not in ("root", "0"), "make install must run as a non-root user"
    assert all(args.split(":")[0] not in ("root", "0") for _, args in users if _ > installs[0])
    assert re.search(r"^install:", (REPO / "Makefile").read_text(), re.M)


def test_dockerfile_copies_only_files_that_exist_and_the_context_keeps():
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert {".venv", ".git", "data/warehouse"} <= set(ignored)
    copies = [args for instr, args in _dockerfile() if instr == "COPY"]
    assert copies
    sources = []
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        sources += parts[:-1]
    for src in sources:
        path = REPO / src
        assert path.exists(), f"Dockerfile COPYs {src}, which is not in the repository"
        assert not any(fnmatch(src.rstrip("/"), pattern) for pattern in ignored), f"{src} is excluded by .dockerignore"
    assert "imaging_assets/" in sources and "data/params/" in sources


def test_dockerfile_serves_the_module_the_chart_loads(values, user_deployment):
    instructions = _dockerfile()
    (cmd,) = [json.loads(args) for instr, args in instructions if instr == "CMD"]
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("-m") + 1] == MODULE == user_deployment["dagsterApiGrpcArgs"][1]
    assert cmd[cmd.index("-p") + 1] == str(user_deployment["port"])
    expose = [args for instr, args in instructions if instr == "EXPOSE"]
    assert str(user_deployment["port"]) in expose
    env_text = " ".join(args for instr, args in instructions if instr == "ENV")
    assert f"IMAGING_ASSETS_WAREHOUSE={_user_env(user_deployment)['IMAGING_ASSETS_WAREHOUSE']}" in env_text
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in env_text  # the chart's dagsterHome default


def test_readme_documents_the_build_and_the_install():
    lines = {line.strip() for line in (REPO / "README.md").read_text().splitlines()}
    missing = [line for line in README_LINES if line not in lines]
    assert not missing, f"README.md lacks the lines {missing}"
