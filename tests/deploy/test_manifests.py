"""deploy/ files against the tools that consume them (no container engine or cluster runs here): every
Kubernetes overlay renders with `kubectl kustomize` and each object validates against its schema (Kubernetes'
own through kubernetes-validate, the KubeRay, Prometheus Operator, Gateway API and Inference Extension CRDs
through their vendored schemas), pods run as non-root with probes and resource requests; the compose file
validates against the compose spec and names only variables env.example documents; the Dockerfiles pass
hadolint."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).parent / "crd-schemas"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
KUBERNETES = "1.33.0"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("LORAPLEX_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{name} is required here")
        pytest.skip(f"{name} is not installed")
    return path


def render(overlay: str) -> list[dict]:
    done = subprocess.run([_tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _crd_schema(doc: dict) -> dict | None:
    group, _, version = doc["apiVersion"].rpartition("/")
    path = SCHEMAS / f"{group}_{doc['kind']}_{version}.json".lower()
    return json.loads(path.read_text()) if group and path.is_file() else None


def test_overlays_exist():
    assert OVERLAYS == ["cluster", "gateway", "single-node"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates(overlay):
    import kubernetes_validate
    docs = render(overlay)
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        assert doc["metadata"].get("namespace") == "loraplex", doc["metadata"]
        schema = _crd_schema(doc)
        if schema is not None:
            jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
        else:  # Kubernetes' own kinds, strictly (no unknown fields)
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    expected = {"single-node": {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                                "ServiceMonitor"},
                "cluster": {"RayService", "Service", "PodDisruptionBudget", "ServiceMonitor"},
                "gateway": {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "InferencePool",
                            "HTTPRoute", "ServiceAccount", "Role", "RoleBinding"}}[overlay]
    assert kinds == expected


def test_a_crd_schema_catches_a_mistake():
    """The vendored schemas are real constraints, not `{}`: a misspelt or mistyped field fails."""
    (pool,) = [d for d in render("gateway") if d["kind"] == "InferencePool"]
    pool["spec"]["targetPorts"] = [{"number": "eight thousand"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, _crd_schema(pool), cls=jsonschema.Draft7Validator)
    import kubernetes_validate
    (deployment,) = [d for d in render("single-node") if d["kind"] == "Deployment"]
    deployment["spec"]["replica"] = 2  # misspelt: strict validation refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    (service,) = [d for d in render("cluster") if d["kind"] == "RayService"]
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, _crd_schema(service), cls=jsonschema.Draft7Validator)


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                                 for g in cluster["workerGroupSpecs"]]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_with_probes_and_requests(overlay):
    specs = [spec for doc in render(overlay) for spec in _pod_specs(doc)]
    assert specs
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            assert "@" not in c["image"] or "sha256" in c["image"]
            assert ":" in c["image"], c["image"]  # a tag from the overlay, never :latest by default
    loraplex = [c for spec in specs for c in spec["containers"] if c["name"] in ("loraplex", "ray-head")]
    for c in loraplex:
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_the_ray_service_deploys_our_application_builder():
    (service,) = [d for d in render("cluster") if d["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "loraplex.serve.cluster:build_application" and app["name"] == "loraplex"
    pytest.importorskip("ray.serve")
    from loraplex.serve.cluster import build_application
    built = build_application(app["args"])  # the flags parse and pass our checks
    engine = built._bound_deployment.init_args[0]._bound_deployment
    assert engine.num_replicas == 2


def test_the_endpoint_picker_reads_loraplex_metric_names():
    """The EPP's metric flags name metrics /metrics really exports."""
    from loraplex.serve.app import build_app
    from tests.serve.fake_engine import MODEL_NAME, FakeEngine
    (epp,) = [d for d in render("gateway") if d["kind"] == "Deployment" and d["metadata"]["name"] == "loraplex-epp"]
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    names = {a.split("=", 1)[1] for a in args if a.startswith("--") and a.split("=")[0].endswith("-metric")}
    assert len(names) == 3
    exported = build_app(FakeEngine(), [MODEL_NAME]).state.metrics.render().decode()
    for name in names - {"loraplex:lora_requests_info"}:  # the LoRA info gauge needs adapters: tested elsewhere
        assert f"\n{name}{{" in exported or exported.startswith(f"{name}{{") or f"# TYPE {name} " in exported, name


# ---- compose ---------------------------------------------------------------------------------------------

def test_compose_file_validates_against_the_compose_spec():
    done = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(DEPLOY / "compose" / "compose.yaml")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_variables_are_documented_and_no_secret_is_committed():
    text = (DEPLOY / "compose" / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = (DEPLOY / "compose" / "env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", example, re.MULTILINE))
    assert used <= documented, used - documented
    assert required <= {m for m in re.findall(r"^([A-Z0-9_]+)=$", example, re.MULTILINE)}  # listed, and left empty
    assert not re.search(r"^[A-Z0-9_]+=\S", example, re.MULTILINE)  # no value set outside comments
    compose = yaml.safe_load(text)
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # nothing published beyond the host


def test_compose_mounts_the_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).exists(), source
        build = service.get("build")
        if build:
            assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).is_file()


# ---- Dockerfiles ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_passes_hadolint(name):
    done = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(DEPLOY / "docker" / name)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / "docker" / name).read_text()
    runs = [line for line in text.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
    assert runs and all("install.sh" in line for line in runs)  # every install step is the tested script
    assert re.search(r"^USER 10001", text, re.MULTILINE) and "HEALTHCHECK" in text and 'VOLUME ["/data"]' in text
