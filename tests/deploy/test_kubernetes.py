"""deploy/kubernetes: schema-valid manifests (kubernetes-validate, offline) and invariants."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conveyor.settings import load_settings
from tests.deploy._files import K8S_DIR, WORKER_ROLES, load_yaml_docs, settings_env_names

Doc = dict[str, Any]

MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
# Oldest Kubernetes minor we support, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
NAMESPACE = "conveyor"
COMMON_LABELS = {"app.kubernetes.io/name": "conveyor", "app.kubernetes.io/part-of": "conveyor"}


def _all_docs() -> list[tuple[Path, Doc]]:
    return [(path, doc) for path in MANIFESTS for doc in load_yaml_docs(path)]


DOCS = _all_docs()


def _ids(items: list[tuple[Path, Doc]]) -> list[str]:
    return [f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}" for _, doc in items]


def _of_kind(kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def _deployment(component: str) -> Doc:
    return _of_kind("Deployment")[f"conveyor-{component}"]


def _config() -> dict[str, str]:
    data: dict[str, str] = _of_kind("ConfigMap")["conveyor-config"]["data"]
    return data


def _pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _container(workload: Doc) -> Doc:
    containers = _pod_spec(workload)["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _workloads() -> list[Doc]:
    return [*_of_kind("Deployment").values(), *_of_kind("Job").values()]


def test_every_manifest_has_documents() -> None:
    assert MANIFESTS
    for path in MANIFESTS:
        assert load_yaml_docs(path), f"{path.name} is empty"


@pytest.mark.parametrize(("path", "doc"), DOCS, ids=_ids(DOCS))
def test_required_fields_and_labels(path: Path, doc: Doc) -> None:
    assert doc.get("apiVersion") and doc.get("kind"), path.name
    metadata = doc["metadata"]
    assert metadata.get("name")
    if doc["kind"] != "Namespace":
        assert metadata.get("namespace") == NAMESPACE
    labels = metadata.get("labels", {})
    assert COMMON_LABELS.items() <= labels.items(), f"{path.name}: missing common labels"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("path", "doc"), DOCS, ids=_ids(DOCS))
def test_schema_valid_strict(path: Path, doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{path.name}: {doc['kind']} invalid for {version} at {where}: {exc.message}")


def test_kustomization_lists_every_manifest_and_image() -> None:
    kustomization = load_yaml_docs(K8S_DIR / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    image_names = {image["name"] for image in kustomization["images"]}
    used = {_container(w)["image"].split(":")[0] for w in _workloads()}
    assert used == image_names == {"conveyor-api", "conveyor-worker"}


def test_kustomize_build_renders_everything() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (its built-in kustomize renders the directory)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(DOCS)
    assert all(d["metadata"].get("namespace", NAMESPACE) == NAMESPACE for d in rendered)


@pytest.mark.parametrize("name", sorted(_of_kind("Deployment")))
def test_deployment_selector_matches_template_labels(name: str) -> None:
    deployment = _of_kind("Deployment")[name]
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert template_labels["app.kubernetes.io/component"] == name.removeprefix("conveyor-")
    assert COMMON_LABELS.items() <= template_labels.items()


@pytest.mark.parametrize("workload", _workloads(), ids=lambda w: w["metadata"]["name"])
def test_containers_are_pinned_resourced_and_locked_down(workload: Doc) -> None:
    pod = _pod_spec(workload)
    container = _container(workload)
    image = container["image"]
    assert ":" in image and not image.endswith(":latest"), f"pin the image tag: {image}"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    # Pod Security Standard "restricted" + read-only root filesystem.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the images' USER
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    # Service links would inject *_PORT=tcp://... variables that can clash with settings.
    assert pod["enableServiceLinks"] is False
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {"conveyor-config", "conveyor-secrets"}


@pytest.mark.parametrize("name", sorted(_of_kind("Deployment")))
def test_termination_grace_exceeds_shutdown_grace(name: str) -> None:
    pod = _pod_spec(_of_kind("Deployment")[name])
    budget = int(_config()["SHUTDOWN_GRACE_MS"]) / 1000
    pre_stop = _container(_of_kind("Deployment")[name]).get("lifecycle", {}).get("preStop")
    if pre_stop is not None:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        budget += float(command[1])
    assert pod["terminationGracePeriodSeconds"] > budget


def test_api_probes_hit_the_health_endpoints_on_the_api_port() -> None:
    api = _deployment("api")
    container = _container(api)
    assert container["args"] == ["api"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(_config()["API_PORT"])}
    assert _config()["API_HOST"] == "0.0.0.0"
    expected = {
        "livenessProbe": "/api/health",
        "readinessProbe": "/api/health/ready",
        "startupProbe": "/api/health",
    }
    for probe, path in expected.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert http_get["port"] in (ports["http"], "http"), probe
    assert api["spec"]["replicas"] > 1


@pytest.mark.parametrize("role", WORKER_ROLES)
def test_worker_roles_use_one_image_and_an_exec_readiness_probe(role: str) -> None:
    deployment = _deployment(role)
    container = _container(deployment)
    assert container["image"].split(":")[0] == "conveyor-worker"
    assert {"name": "WORKER_SCRIPT", "value": role} in container["env"]
    assert "ports" not in container and "args" not in container and "command" not in container
    assert container["readinessProbe"]["exec"]["command"] == ["conveyor", "check"]
    assert container["readinessProbe"]["timeoutSeconds"] >= 10
    assert container["readinessProbe"]["periodSeconds"] >= 30
    # Deliberately none (see docs/deployment.md, "Probes"): a Redis outage must not
    # restart every worker.
    assert "livenessProbe" not in container


@pytest.mark.parametrize("role", WORKER_ROLES)
def test_worker_roles_run_more_than_one_replica(role: str) -> None:
    # worker: capacity and failover; scheduler: one active + standby; timers: SKIP LOCKED.
    assert _deployment(role)["spec"]["replicas"] >= 2


def test_worker_images_are_identical_across_roles() -> None:
    assert len({_container(_deployment(role))["image"] for role in WORKER_ROLES}) == 1


def test_migration_job_runs_once_with_the_cli_image() -> None:
    job = _of_kind("Job")["conveyor-migrate"]
    pod = _pod_spec(job)
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    assert job["spec"]["backoffLimit"] >= 1
    container = _container(job)
    assert container["args"] == ["migrate"]
    assert container["image"] == _container(_deployment("api"))["image"]


def test_service_routes_to_the_api_pods() -> None:
    service = _of_kind("Service")["conveyor-api"]
    api = _deployment("api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in _container(api)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_disruption_budgets_select_existing_deployments() -> None:
    budgets = _of_kind("PodDisruptionBudget")
    assert {"conveyor-worker", "conveyor-scheduler"} <= set(budgets)
    deployments = _of_kind("Deployment")
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_settings_keys_are_known_and_secrets_are_placeholders() -> None:
    config = _config()
    secret = _of_kind("Secret")["conveyor-secrets"]["stringData"]
    assert set(secret) == {"DATABASE_URL", "ADMIN_TOKEN", "QUEUE_REDIS_PASSWORD", "SECRETS_KEY"}
    assert not set(config) & set(secret)
    unknown = (set(config) | set(secret)) - settings_env_names()
    assert not unknown, f"variables Conveyor does not read: {sorted(unknown)}"
    # Never commit a real credential: every secret value is a marked placeholder (SECRETS_KEY
    # is empty: tenants' secrets stay disabled until a generated key is put there).
    assert secret["SECRETS_KEY"] == ""
    assert all("CHANGE-ME" in v for k, v in secret.items() if k != "SECRETS_KEY")
    settings = load_settings({**config, **secret})
    assert settings.is_postgres and settings.driver == "bullmq"
    assert settings.api_host == "0.0.0.0"
