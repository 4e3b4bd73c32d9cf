"""deploy/: the compose file and the Kubernetes manifests describe one topology (no docker here, so
the files are parsed and checked: services, commands, ports, secrets)."""

from __future__ import annotations

import re

import pytest
import yaml

from pipeline.core._secrets import url_secrets

from conftest import REPO

DEPLOY = REPO / "deploy"
REPO = DEPLOY.parent
STORAGE_FLAGS = ["--storage", "grpc://proxy:13000", "--tracking-uri", "http://mlflow:5000"]
PASSWORD_KEY = re.compile(r"PASSWORD", re.IGNORECASE)


def strings(node):
    """Every string in a parsed YAML tree (keys and values)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def has_sequence(command: list[str], part: list[str]) -> bool:
    return any(command[i : i + len(part)] == part for i in range(len(command) - len(part) + 1))


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def manifests():
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    docs = []
    for name in [*kustomization["resources"], "report-job.yaml"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]
    return docs


def test_compose_services_form_the_topology(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "proxy", "mlflow", "dashboard", "worker"}
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert set(postgres["environment"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert "./initdb:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    assert "CREATE DATABASE mlflow;" in (DEPLOY / "compose" / "initdb" / "10-mlflow-database.sql").read_text()

    proxy = services["proxy"]["command"]
    assert proxy[:2] == ["sweep", "storage-proxy"] and proxy[2].endswith("@postgres:5432/optuna")
    assert (flag(proxy, "--host"), flag(proxy, "--port")) == ("0.0.0.0", "13000")

    mlflow = services["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow
    assert flag(mlflow, "--backend-store-uri").startswith("postgresql+psycopg://sweep@postgres:5432/mlflow")
    assert flag(mlflow, "--artifacts-destination") == "/mlartifacts"
    assert "mlflow:5000" in flag(mlflow, "--allowed-hosts").split(","), "workers' Host header is accepted"

    worker = services["worker"]
    command = worker["command"]
    assert command[:2] == ["sweep", "run"] and "--no-report" in command
    assert has_sequence(command, STORAGE_FLAGS[:2]) and has_sequence(command, STORAGE_FLAGS[2:])
    assert {name: dep["condition"] for name, dep in worker["depends_on"].items()} == {
        "proxy": "service_healthy",
        "mlflow": "service_healthy",
    }
    assert services["proxy"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "sweep-home:/sweep-home" in worker["volumes"], "the report reads the workers' checkpoints"
    assert {s["image"] for n, s in services.items() if n != "postgres"} == {"${SWEEP_IMAGE:-sweep:latest}"}
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_study_default_exists_and_readme_covers_the_steps(compose):
    study = re.fullmatch(r"\$\{STUDY:-(.+)\}", compose["services"]["worker"]["command"][2])
    assert study and (REPO / study.group(1)).is_file()
    readme = (DEPLOY / "compose" / "README.md").read_text()
    for needle in (
        "docker compose up --build -d",
        "--scale worker=",
        "http://localhost:5000",
        "http://localhost:8080",
        "sweep report",
        "cp .env.example .env",
    ):
        assert needle in readme, needle


def test_compose_holds_no_password_literal(compose):
    for text in strings(compose):
        assert not url_secrets(text), f"password in a URL: {text}"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if PASSWORD_KEY.search(key):
                assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", value), f"{name}.{key} = {value!r}"
    assert (DEPLOY / "compose" / ".gitignore").read_text().split() == [".env"]


def _by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]


def test_kubernetes_services_select_pods_on_named_ports(manifests):
    services = _by_kind(manifests, "Service")
    assert set(services) == {"postgres", "proxy", "mlflow", "optuna-dashboard"}
    pods = dict(_pod_specs(manifests))
    for name, service in services.items():
        selector = service["spec"]["selector"]
        matching = [p for p in pods.values() if selector.items() <= p["metadata"]["labels"].items()]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} pod templates"
        ports = {p["name"]: p["containerPort"] for c in matching[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"], f"Service {name} port {port}"
    assert pods["postgres"]["spec"]["containers"][0]["image"].startswith("postgres:")


def test_kubernetes_workers_are_an_indexed_job_on_the_proxy_and_mlflow(manifests):
    jobs = _by_kind(manifests, "Job")
    workers = jobs["sweep-workers"]["spec"]
    assert workers["completionMode"] == "Indexed" and workers["parallelism"] == workers["completions"] > 1
    command = workers["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["sweep", "run"] and "--no-report" in command and (REPO / command[2]).is_file()
    assert has_sequence(command, STORAGE_FLAGS[:2]) and has_sequence(command, STORAGE_FLAGS[2:])
    report = jobs["sweep-report"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert report[:3] == ["sweep", "report", command[2]] and has_sequence(report, STORAGE_FLAGS[:2])
    claims = _by_kind(manifests, "PersistentVolumeClaim")
    assert claims["sweep-home"]["spec"]["accessModes"] == ["ReadWriteMany"]
    mlflow = dict(_pod_specs(manifests))["mlflow"]["spec"]["containers"][0]["command"]
    assert "--serve-artifacts" in mlflow and "mlflow:5000" in flag(mlflow, "--allowed-hosts").split(",")
    proxy = dict(_pod_specs(manifests))["optuna-storage-proxy"]["spec"]["containers"][0]["command"]
    assert proxy[:2] == ["sweep", "storage-proxy"] and flag(proxy, "--port") == "13000"


def test_kubernetes_passwords_come_from_the_secret(manifests):
    assert not _by_kind(manifests, "Secret"), "the Secret is created by kubectl, never committed"
    for text in strings(manifests):
        assert not url_secrets(text), f"password in a URL: {text}"
    seen = 0
    for name, template in _pod_specs(manifests):
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if PASSWORD_KEY.search(env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} is a literal"
                    assert env["valueFrom"]["secretKeyRef"] == {"name": "sweep-postgres", "key": "password"}
                    seen += 1
    assert seen == 4  # postgres, proxy, mlflow, dashboard
    readme = (DEPLOY / "kubernetes" / "README.md").read_text()
    for needle in (
        "kubectl create secret generic sweep-postgres",
        "kubectl apply -k deploy/kubernetes",
        "parallelism",
        "svc/mlflow 5000:5000",
        "svc/optuna-dashboard 8080:8080",
        "report-job.yaml",
    ):
        assert needle in readme, needle


def test_dockerfile_installs_the_extras_the_topology_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    assert '".[postgres,grpc]"' in text and "optuna-dashboard" in text
    for source in re.findall(r"^COPY (\S+)", text, flags=re.MULTILINE):
        assert (REPO / source).exists(), source
    assert "USER sweep" in text
