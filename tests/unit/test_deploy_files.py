"""deploy/: the image, compose, HAProxy and Kubernetes files, checked without Docker or a cluster.

No engine runs here, so these tests read the files: YAML parses, Kubernetes objects are
well-formed and point at each other, probes and health checks hit /healthz on the port the
broker listens on, grace periods outlast the drain, and every REDWIRE_* variable named
anywhere in the deploy files and the operator docs is a real setting with a valid value.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from broker.settings import ENV_PREFIX, Settings
from worker.metrics import Metrics
from worker.stats import WorkerStats

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PORT = 8765
SUPERVISOR_KILL_MARGIN_S = Settings().kill_grace_s  # workers are killed drain + this late
ENV_NOT_FIELDS = {ENV_PREFIX + "CONFIG"}  # the TOML file's path: read by Settings.load
FIELDS = {name.upper() for name in Settings.__dataclass_fields__}


# --- helpers ------------------------------------------------------------------------------------


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [d for d in of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def seconds(value: str | int | float) -> float:
    """A duration as compose ("1m30s", "20s") or HAProxy ("1h", "60s", "500ms", "5000") write it."""
    if isinstance(value, int | float):
        return float(value)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    text = value.strip()
    if text.isdigit():  # HAProxy: a bare number is milliseconds
        return int(text) / 1000
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def load_settings(env: dict[str, str]) -> Settings:
    """What a broker started with these REDWIRE_* variables would run with (or ConfigError)."""
    return Settings.load(environ={k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def dockerfile() -> list[list[tuple[str, str]]]:
    """Stages of deploy/Dockerfile, each a list of (INSTRUCTION, arguments)."""
    logical: list[str] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for word, args in stage if word == name]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(stage, "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def haproxy_sections() -> dict[str, list[str]]:
    """'kind name' (or 'global', 'defaults') -> its directive lines, comments stripped."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            assert current is not None, f"directive outside a section: {raw}"
            current.append(" ".join(line.split()))
    return sections


def haproxy_directive(lines: list[str], prefix: str) -> list[str]:
    return [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]


# --- Kubernetes ---------------------------------------------------------------------------------


def test_k8s_files_parse_into_documents() -> None:
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert {"Ingress", "StatefulSet"} <= kinds


@pytest.mark.parametrize(
    ("filename", "doc"), k8s_docs(), ids=[f"{f}:{d.get('kind')}" for f, d in k8s_docs()]
)
def test_every_k8s_document_has_api_version_kind_and_name(filename: str, doc: dict) -> None:
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], filename
    assert isinstance(doc.get("kind"), str) and doc["kind"], filename
    assert isinstance(doc.get("metadata"), dict) and doc["metadata"].get("name"), filename


def test_kustomization_lists_files_that_exist() -> None:
    kustomization = one("Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def broker_container() -> dict[str, Any]:
    containers = one("Deployment", "redwire")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"no container port named {port!r}"
    return named[port]


def test_deployment_runs_three_replicas_listening_on_the_broker_port() -> None:
    deployment = one("Deployment", "redwire")
    assert deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = broker_container()
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    assert container["image"].split("/")[-1].startswith("redwire")
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_probes_get_healthz_on_the_container_port() -> None:
    container = broker_container()
    probes = [k for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in container]
    assert {"readinessProbe", "livenessProbe"} <= set(probes)
    for probe in probes:
        check = container[probe]["httpGet"]
        assert check["path"] == "/healthz", probe
        assert container_port(container, check["port"]) == PORT, probe


def test_pods_run_as_the_images_non_root_user() -> None:
    pod = one("Deployment", "redwire")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    final_stage = dockerfile()[-1]
    assert instructions(final_stage, "USER")[-1].split(":")[0] == str(
        pod["securityContext"]["runAsUser"]
    )


def configmap_env() -> dict[str, str]:
    container = broker_container()
    names = [s["configMapRef"]["name"] for s in container.get("envFrom", [])]
    assert names, "the broker's settings should come from a ConfigMap (envFrom)"
    env: dict[str, str] = {}
    for name in names:
        env.update(one("ConfigMap", name)["data"])
    return env


def test_settings_come_from_a_configmap_with_a_redis_url_and_load() -> None:
    env = configmap_env()
    settings = load_settings(env)
    assert settings.redis_url, "pods need REDWIRE_REDIS_URL: the image has no redis-server"
    assert settings.workers >= 1, "set REDWIRE_WORKERS: cpu_count() ignores the CPU limit"
    limit = broker_container()["resources"]["limits"]["cpu"]
    cpus = float(limit[:-1]) / 1000 if str(limit).endswith("m") else float(limit)
    assert settings.workers <= max(1, cpus)


def test_redis_url_names_the_in_cluster_redis_service() -> None:
    host = urlsplit(load_settings(configmap_env()).redis_url or "").hostname
    service = one("Service", host)
    redis = one("StatefulSet", host)
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:7")
    assert service["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )


def prestop_sleep_s(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:  # Kubernetes >= 1.30
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    pod = one("Deployment", "redwire")["spec"]["template"]["spec"]
    container = broker_container()
    drain = load_settings(configmap_env()).drain_timeout_s
    needed = prestop_sleep_s(container) + drain + SUPERVISOR_KILL_MARGIN_S
    assert prestop_sleep_s(container) > 0, "a preStop sleep lets endpoints catch up first"
    assert pod["terminationGracePeriodSeconds"] > needed


def test_service_and_budget_select_the_broker_pods() -> None:
    labels = one("Deployment", "redwire")["spec"]["template"]["metadata"]["labels"]
    service = one("Service", "redwire")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert container_port(broker_container(), port["targetPort"]) == PORT
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in budget["spec"] or "minAvailable" in budget["spec"]


def test_ingress_keeps_websockets_open_and_routes_to_the_service() -> None:
    ingress = one("Ingress")
    notes = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    service_ports = one("Service", "redwire")["spec"]["ports"]
    reachable = {p["name"] for p in service_ports} | {p["port"] for p in service_ports}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "redwire"
            assert backend["port"].get("name", backend["port"].get("number")) in reachable


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_builds_on_python_slim_with_a_gcc_builder_stage() -> None:
    stages = dockerfile()
    assert len(stages) >= 2, "a builder stage for the C extension, then the runtime"
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"
    builder = " ".join(instructions(stages[0], "RUN"))
    assert "gcc" in builder and "pip install ." in builder
    assert "import broker._speedups" in builder, "the build should fail without the extension"
    runtime = " ".join(instructions(stages[-1], "RUN"))
    assert "gcc" not in runtime


def test_dockerfile_copies_every_package_pyproject_installs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {
        src.rstrip("/")
        for args in instructions(dockerfile()[0], "COPY")
        if not args.startswith("--from")
        for src in shlex.split(args)[:-1]
    }
    top_level = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    assert top_level | {"pyproject.toml", project["project"]["readme"]} <= copied


def test_dockerfile_installs_no_redis_server() -> None:
    for stage in dockerfile():
        for args in instructions(stage, "RUN"):
            assert "redis-server" not in args
            for packages in re.findall(r"apt-get install ([^&;|]+)", args):
                names = [w for w in packages.split() if not w.startswith("-")]
                assert not [n for n in names if n.startswith("redis")], names


def test_dockerfile_runs_redwire_serve_as_a_non_root_user() -> None:
    final = dockerfile()[-1]
    (cmd,) = instructions(final, "CMD")
    argv = json.loads(cmd)  # exec form: redwire is PID 1 and gets the SIGTERM itself
    assert argv[:2] == ["redwire", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert int(argv[argv.index("--port") + 1]) == PORT
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["redwire"] == "broker.cli:main"
    user = instructions(final, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert str(PORT) in instructions(final, "EXPOSE")[-1].split()
    assert instructions(final, "STOPSIGNAL") == ["SIGTERM"]


def healthcheck_argv() -> list[str]:
    (check,) = instructions(dockerfile()[-1], "HEALTHCHECK")
    _, _, command = check.partition(" CMD ")
    return json.loads(command)


def test_dockerfile_healthcheck_is_python_urllib_on_healthz() -> None:
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "urllib" in code and f"http://127.0.0.1:{PORT}/healthz" in code


def test_dockerfile_env_is_valid_settings() -> None:
    env = dockerfile_env(dockerfile()[-1])
    assert env.get(ENV_PREFIX + "WORKERS"), "workers count from REDWIRE_WORKERS"
    assert load_settings(env).workers >= 1


# --- docker compose -----------------------------------------------------------------------------


def test_compose_runs_redis_with_a_healthcheck() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_compose_runs_several_replicas_on_the_image_and_redis() -> None:
    services = compose()["services"]
    broker = services["redwire"]
    build = broker["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert broker["deploy"]["replicas"] >= 2
    settings = load_settings(broker["environment"])
    assert urlsplit(settings.redis_url or "").hostname in services
    assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in broker, "replicas are reached through the load balancer only"


def test_compose_grace_period_outlasts_the_drain() -> None:
    broker = compose()["services"]["redwire"]
    drain = load_settings(broker["environment"]).drain_timeout_s
    assert seconds(broker["stop_grace_period"]) > drain + SUPERVISOR_KILL_MARGIN_S
    assert broker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_load_balancer_mounts_haproxy_cfg_and_reaches_every_replica() -> None:
    services = compose()["services"]
    lb = services["haproxy"]
    mounts = [v.split(":") for v in lb["volumes"]]
    assert any((DEPLOY / src).resolve() == DEPLOY / "haproxy.cfg" for src, *_ in mounts)
    backend = haproxy_sections()["backend redwire"]
    (template,) = haproxy_directive(backend, "server-template ")
    _, slots, address = template.split()[:3]
    assert int(slots) >= services["redwire"]["deploy"]["replicas"]
    host, port = address.rsplit(":", 1)
    assert host == "redwire" and int(port) == PORT
    published = {int(p.split(":")[-1]) for p in lb["ports"]}
    bind = haproxy_directive(haproxy_sections()["frontend redwire_in"], "bind ")
    assert int(bind[0].split(":")[-1].split()[0]) in published


# --- haproxy.cfg --------------------------------------------------------------------------------


def test_haproxy_balances_by_connections_and_checks_healthz() -> None:
    backend = haproxy_sections()["backend redwire"]
    assert "balance leastconn" in backend
    assert "option httpchk GET /healthz" in backend
    assert "http-check expect status 200" in backend
    servers = haproxy_directive(backend, "default-server ") + haproxy_directive(
        backend, "server-template "
    )
    assert any(" check" in f" {line}" for line in servers), "servers need `check`"
    assert not any("shutdown-sessions" in line for line in backend), (
        "a failed check must not cut open WebSockets"
    )


def test_haproxy_keeps_websocket_tunnels_and_forwards_client_address() -> None:
    sections = haproxy_sections()
    lines = sections["defaults"] + sections["backend redwire"]
    assert all(line.split()[1] == "http" for line in lines if line.startswith("mode "))
    (tunnel,) = haproxy_directive(lines, "timeout tunnel ")
    assert seconds(tunnel) >= 3600
    assert "option forwardfor" in lines
    assert "option redispatch" in lines


# --- REDWIRE_* variables and the operator docs ----------------------------------------------------


def files_naming_settings() -> Iterator[Path]:
    yield from sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    yield REPO / "docs" / "operations.md"


@pytest.mark.parametrize("path", list(files_naming_settings()), ids=lambda p: p.name)
def test_every_redwire_variable_named_is_a_setting(path: Path) -> None:
    named = set(re.findall(r"\bREDWIRE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    unknown = {n for n in named - ENV_NOT_FIELDS if n[len(ENV_PREFIX) :] not in FIELDS}
    assert not unknown, f"{path.name} names variables no setting reads: {sorted(unknown)}"


def test_operations_settings_table_names_real_fields() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1]):
            assert name.upper() in FIELDS, name


def test_operations_lists_every_metric_the_workers_export() -> None:
    metrics = Metrics("0", WorkerStats(), dict)
    exported = {
        m.name + "_total" if m.type == "counter" else m.name for m in metrics.registry.collect()
    }
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(redwire_[a-z_]+)`", section, re.MULTILINE))
    assert documented == exported


# --- the Redis Cluster variant (compose override and Kubernetes overlay) -------------------


def cluster_hosts(url: str) -> list[str]:
    """host:port entries of a redis+cluster:// URL."""
    assert url.startswith("redis+cluster://"), url
    netloc = url[len("redis+cluster://") :].split("/", 1)[0].rpartition("@")[2]
    return netloc.split(",")


def test_compose_cluster_variant_points_the_brokers_at_every_cluster_node() -> None:
    override = yaml.safe_load((DEPLOY / "docker-compose.cluster.yml").read_text())
    services = override["services"]
    redwire = services["redwire"]
    url = redwire["environment"]["REDWIRE_REDIS_URL"]
    assert load_settings({"REDWIRE_REDIS_URL": url}).redis_url == url
    hosts = cluster_hosts(url)
    nodes = [
        name for name, svc in services.items() if "--cluster-enabled" in svc.get("command", [])
    ]
    assert sorted(h.split(":")[0] for h in hosts) == sorted(nodes)
    for name in nodes:
        command = services[name]["command"]
        # each node announces its own service name, which the brokers resolve
        assert command[command.index("--cluster-announce-hostname") + 1] == name
    init = " ".join(services["redis-cluster-init"]["command"])
    assert all(host in init for host in hosts) and "--cluster create" in init
    condition = redwire["depends_on"]["redis-cluster-init"]["condition"]
    assert condition == "service_completed_successfully"
    assert set(compose()["services"]) >= {"redwire", "haproxy"}  # layered over the base


def k8s_cluster_docs() -> list[dict[str, Any]]:
    text = (K8S / "cluster" / "redis-cluster.yaml").read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def test_k8s_cluster_overlay_replaces_redis_with_a_cluster_the_brokers_can_reach() -> None:
    kustomization = yaml.safe_load((K8S / "cluster" / "kustomization.yaml").read_text())
    assert "../" in kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (K8S / "cluster" / resource).exists(), resource
    patches = [yaml.safe_load(p["patch"]) for p in kustomization["patches"]]
    deleted = {(p["kind"], p["metadata"]["name"]) for p in patches if p.get("$patch") == "delete"}
    assert deleted == {("StatefulSet", "redis"), ("Service", "redis")}
    (config,) = [p for p in patches if p["kind"] == "ConfigMap"]
    assert config["metadata"]["name"] == one("ConfigMap")["metadata"]["name"]
    url = config["data"]["REDWIRE_REDIS_URL"]
    assert load_settings({"REDWIRE_REDIS_URL": url}).redis_url == url
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_cluster_docs()}
    service = docs[("Service", "redis-cluster")]
    statefulset = docs[("StatefulSet", "redis-cluster")]
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "redis-cluster"
    replicas = statefulset["spec"]["replicas"]
    expected = [f"redis-cluster-{i}.redis-cluster:6379" for i in range(replicas)]
    assert cluster_hosts(url) == expected
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert ports == {"redis", "cluster-bus"}
    job = docs[("Job", "redis-cluster-init")]
    init = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert all(host in init for host in expected)
