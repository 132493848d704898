"""The deployment files agree with the code and keep their promises.

docker-compose.yml is read through ``docker compose config`` (skipped where the Docker CLI
or its compose plugin is missing); the NATS configs are checked by the real nats-server;
Prometheus files by ``promtool``, which ``make test`` takes out of Debian's ``prometheus``
package.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contracts.streams import consumer_specs
from workers.cli import WORKERS
from workers.runtime.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NATS_DIR = ROOT / "infra" / "nats"
PROMETHEUS = ROOT / "infra" / "prometheus.yml"
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tickwire.json"
NATS_SERVER = Path(sys.executable).parent / "nats-server"
PROMTOOL = ROOT / ".cache" / "prometheus" / "usr" / "bin" / "promtool"

# Every secret docker-compose.yml takes from the environment, with a recognisable value.
SECRETS = {
    name: f"secret-{name.lower().replace('_', '-')}"
    for name in (
        "POSTGRES_PASSWORD",
        "QUESTDB_PG_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "NATS_OPS_PASSWORD",
        "NATS_SYS_PASSWORD",
        "NATS_EA_PASSWORD",
        "NATS_SUBSCRIBER_EXAMPLE_PASSWORD",
        "NATS_CANDLE_INGEST_PASSWORD",
        "NATS_FEATURE_BUILDER_PASSWORD",
        "NATS_MODEL_SCORER_PASSWORD",
        "NATS_SIGNAL_PUBLISHER_PASSWORD",
        "NATS_TIMESCALE_REPLICATOR_PASSWORD",
        "NATS_SCHEDULER_PASSWORD",
        "NATS_ROUTE_PASSWORD",
    )
}

# Metrics a panel may use that no WorkerMetrics defines: Prometheus' own scrape health, and
# the scorer's model gauge (labels ``key``, ``version``), exported by the model scorer itself.
EXTRA_METRICS = {"up", "tickwire_scorer_active_model"}
# What the dashboard must show (design: Ops).
REQUIRED_METRICS = {
    "tickwire_messages_in_total",
    "tickwire_messages_out_total",
    "tickwire_processing_seconds_bucket",
    "tickwire_e2e_latency_seconds_bucket",
    "tickwire_consumer_pending",
    "tickwire_dead_letters_total",
    "tickwire_batch_size_bucket",
    "tickwire_up",
    "tickwire_scorer_active_model",
}


# --- docker compose ----------------------------------------------------------------------


def _compose_env(**overrides: str) -> dict[str, str]:
    """A clean environment: PATH and the Docker client's own settings, plus the secrets."""
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "DOCKER_CONFIG"}}
    return {**env, **SECRETS, **overrides}


@functools.cache
def _docker_compose() -> str | None:
    """The docker CLI, if its compose plugin answers."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    done = subprocess.run(
        [docker, "compose", "version"], capture_output=True, env=_compose_env(), timeout=30
    )
    return docker if done.returncode == 0 else None


def _run_compose(
    env_file: Path, *profiles: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    docker = _docker_compose()
    if docker is None:
        pytest.skip("the docker CLI or its compose plugin is not installed")
    flags = [arg for p in profiles for arg in ("--profile", p)]
    return subprocess.run(
        [docker, "compose", "--env-file", str(env_file), "-f", str(COMPOSE), *flags,
         "config", "--format", "json"],
        capture_output=True, text=True, env=env or _compose_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty env file, so that a developer's own .env does not change what is tested."""
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def compose(env_file: Path) -> dict[str, dict[str, Any]]:
    """``docker compose config`` of the default deployment and of the cluster profile."""
    out: dict[str, dict[str, Any]] = {}
    for key, profiles in (("default", ()), ("cluster", ("cluster",))):
        done = _run_compose(env_file, *profiles)
        assert done.returncode == 0, done.stderr
        out[key] = json.loads(done.stdout)
    return out


def _services(compose: dict[str, dict[str, Any]], profile: str) -> dict[str, Any]:
    services: dict[str, Any] = compose[profile]["services"]
    return services


def _nats_nodes(services: dict[str, Any]) -> set[str]:
    return {name for name, s in services.items() if s["image"].startswith("nats:")}


@pytest.mark.parametrize("profile", ["default", "cluster"])
def test_every_published_port_is_on_loopback(
    compose: dict[str, dict[str, Any]], profile: str
) -> None:
    published = [
        (name, port)
        for name, service in _services(compose, profile).items()
        for port in service.get("ports", [])
    ]
    assert published, "nothing published at all"
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_one_service_per_worker(compose: dict[str, dict[str, Any]]) -> None:
    services = _services(compose, "default")
    for worker in WORKERS:  # the pipeline workers and the trainer scheduler
        service = services.get(worker)
        assert service is not None, f"no service for worker {worker}"
        assert service["command"] == ["run", worker]
        assert service["build"]["dockerfile"] == "Dockerfile"
        env = service["environment"]
        assert env["TICKWIRE_NATS_USER"] == worker, "each worker has its own NATS user"
        assert env["TICKWIRE_METRICS_HOST"] == "0.0.0.0"
        assert env["TICKWIRE_METRICS_PORT"].isdigit()
        assert service["depends_on"]["streams"]["condition"] == "service_completed_successfully"
        if "TICKWIRE_POSTGRES_DSN" in env:
            assert service["depends_on"]["migrate"]["condition"] == (
                "service_completed_successfully"
            )
        assert "healthz" in " ".join(service["healthcheck"]["test"])
        assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("profile", ["default", "cluster"])
def test_the_scheduler_writes_its_reports_where_its_read_only_container_may(
    compose: dict[str, dict[str, Any]], profile: str
) -> None:
    service = _services(compose, profile)["scheduler"]
    assert service["read_only"] is True
    out = service["environment"]["TICKWIRE_TRAIN_OUT"]
    writable = [*service.get("tmpfs", []), *(v["target"] for v in service.get("volumes", []))]
    assert any(out.startswith(f"{w.rstrip('/')}/") for w in writable), (out, writable)


def test_metrics_ports_are_distinct(compose: dict[str, dict[str, Any]]) -> None:
    services = _services(compose, "default")
    ports = [services[w]["environment"]["TICKWIRE_METRICS_PORT"] for w in WORKERS]
    assert len(set(ports)) == len(ports)


def test_setup_jobs_run_once_before_the_workers(compose: dict[str, dict[str, Any]]) -> None:
    services = _services(compose, "default")
    migrate, streams = services["migrate"], services["streams"]
    assert migrate["command"] == ["db", "migrate"]
    assert streams["command"][:2] == ["streams", "ensure"]
    for job in (migrate, streams):
        assert job["restart"] == "no"
    assert migrate["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    assert streams["depends_on"]["nats"]["condition"] == "service_healthy"
    for name in ("nats", "questdb", "timescaledb"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck to wait on"


def test_cluster_profile_has_three_nats_nodes(compose: dict[str, dict[str, Any]]) -> None:
    assert _nats_nodes(_services(compose, "default")) == {"nats"}
    services = _services(compose, "cluster")
    nodes = _nats_nodes(services) - {"nats"}
    assert nodes == {"nats-1", "nats-2", "nats-3"}
    names = {services[n]["environment"]["NATS_SERVER_NAME"] for n in nodes}
    assert names == nodes, "cluster nodes need distinct server names"
    for node in nodes:
        assert services[node]["profiles"] == ["cluster"]
        assert "cluster-node.conf" in " ".join(services[node]["command"])
        routes = {services[node]["environment"][f"NATS_ROUTE_{i}"] for i in (1, 2, 3)}
        assert routes == {
            f"nats-route://route:{SECRETS['NATS_ROUTE_PASSWORD']}@{n}:6222" for n in nodes
        }


def test_passwords_come_from_the_environment(compose: dict[str, dict[str, Any]]) -> None:
    secrets = set(SECRETS.values())
    for name, service in _services(compose, "cluster").items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("PASSWORD"):
                assert value in secrets, f"{name}: {key} is not taken from the environment"
    dsn = _services(compose, "default")["timescale-replicator"]["environment"]
    assert SECRETS["POSTGRES_PASSWORD"] in dsn["TICKWIRE_POSTGRES_DSN"]


def test_a_missing_password_stops_compose(env_file: Path) -> None:
    env = _compose_env()
    del env["NATS_EA_PASSWORD"]
    done = _run_compose(env_file, env=env)
    assert done.returncode != 0
    assert "NATS_EA_PASSWORD" in done.stderr


def test_nats_servers_get_every_variable_their_config_references(
    compose: dict[str, dict[str, Any]],
) -> None:
    def referenced(conf: str) -> set[str]:
        return set(re.findall(r"\$(NATS_\w+)", (NATS_DIR / conf).read_text()))

    services = _services(compose, "cluster")
    for node in _nats_nodes(services):
        wanted = referenced("accounts.conf")
        if node != "nats":
            wanted |= referenced("cluster-node.conf")
        missing = wanted - set(services[node]["environment"])
        assert not missing, f"{node} lacks {sorted(missing)}"


def test_prometheus_scrapes_each_worker_on_its_port(compose: dict[str, dict[str, Any]]) -> None:
    text = PROMETHEUS.read_text()
    services = _services(compose, "default")
    for worker in WORKERS:
        port = services[worker]["environment"]["TICKWIRE_METRICS_PORT"]
        assert f'"{worker}:{port}"' in text


# --- NATS --------------------------------------------------------------------------------


def _nats_check(conf: Path, **env: str) -> subprocess.CompletedProcess[str]:
    if not NATS_SERVER.exists():
        pytest.skip(f"no nats-server at {NATS_SERVER}")
    return subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(conf)],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}, timeout=30,
    )  # fmt: skip


def _nats_env() -> dict[str, str]:
    env = {k: v for k, v in SECRETS.items() if k.startswith("NATS_")}
    return {
        **env,
        "NATS_SERVER_NAME": "nats-1",
        **{f"NATS_ROUTE_{i}": f"nats-route://route:pw@nats-{i}:6222" for i in (1, 2, 3)},
    }


@pytest.mark.parametrize("conf", ["nats.conf", "cluster-node.conf"])
def test_nats_config_is_valid(conf: str) -> None:
    done = _nats_check(NATS_DIR / conf, **_nats_env())
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stderr + done.stdout


def test_nats_config_refuses_a_missing_password() -> None:
    env = _nats_env()
    del env["NATS_EA_PASSWORD"]
    done = _nats_check(NATS_DIR / "nats.conf", **env)
    assert done.returncode != 0
    assert "NATS_EA_PASSWORD" in done.stderr


def _permissions(user: str) -> str:
    """The text of a user's permission block in accounts.conf."""
    text = (NATS_DIR / "accounts.conf").read_text()
    var = user.upper().replace("-", "_") + "_PERMISSIONS"
    match = re.search(rf"^{var}: \{{\n(.*?)^\}}$", text, re.M | re.S)
    assert match is not None, f"no {var} in accounts.conf"
    assert f"permissions: ${var}" in text, f"{var} is given to no user"
    return match.group(1)


def test_each_worker_may_pull_and_ack_its_consumers_only() -> None:
    for spec in consumer_specs():
        block = _permissions(spec.durable)
        for prefix, suffix in (("$JS.API.CONSUMER.MSG.NEXT.", ""), ("$JS.ACK.", ".>")):
            exact = f'"{prefix}{spec.stream}.{spec.durable}{suffix}"'
            any_stream = f'"{prefix}*.{spec.durable}{suffix}"'
            assert exact in block or any_stream in block, f"{spec.label}: {prefix}"
        assert f'"dlq.{spec.durable}"' in block
        assert '"dlq.>"' not in block
        # nothing but its own consumer: every consumer subject names this worker
        for subject in re.findall(r'"(\$JS\.(?:API\.CONSUMER\.MSG\.NEXT|ACK)\.[^"]+)"', block):
            assert f".{spec.durable}" in subject, f"{spec.durable} may use {subject}"


def test_the_ea_may_only_publish_ticks() -> None:
    block = _permissions("ea")
    assert re.findall(r"publish: \{ allow: \[([^\]]*)\]", block) == ['"ticks.>"']
    assert re.findall(r"subscribe: \{ allow: \[([^\]]*)\]", block) == ["$INBOX"]


def test_nats_max_payload_fits_the_largest_stream_message() -> None:
    from contracts.streams import stream_specs

    largest = max(s.max_msg_size for s in stream_specs())
    for conf in ("nats.conf", "cluster-node.conf"):
        match = re.search(r"^max_payload: (\d+)MB$", (NATS_DIR / conf).read_text(), re.M)
        assert match is not None, conf
        assert int(match.group(1)) * 1024 * 1024 >= largest, conf


# --- Prometheus and Grafana --------------------------------------------------------------


def _known_metrics() -> set[str]:
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in WorkerMetrics("test").registry.collect()
        for suffix in suffixes[family.type]
    }


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()", without_labels))
    return {w for w in words if w.startswith("tickwire_") or w == "up"}


def test_dashboard_uses_only_existing_metrics() -> None:
    known = _known_metrics() | EXTRA_METRICS
    used = set().union(*map(_metric_names, _dashboard_exprs()))
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


def test_dashboard_shows_what_ops_watch() -> None:
    used = set().union(*map(_metric_names, _dashboard_exprs()))
    assert used >= REQUIRED_METRICS, f"not on the dashboard: {sorted(REQUIRED_METRICS - used)}"


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = re.search(
        r"^\s+uid: (\S+)$", (GRAFANA / "datasources" / "prometheus.yml").read_text(), re.M
    )
    assert uid is not None
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid.group(1), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboards_provider_points_where_compose_mounts_them() -> None:
    provider = (GRAFANA / "dashboards" / "dashboards.yml").read_text()
    assert "path: /etc/grafana/provisioning/dashboards" in provider
    assert "./infra/grafana/dashboards:/etc/grafana/provisioning/dashboards:ro" in (
        COMPOSE.read_text()
    )


def test_prometheus_scrapes_every_worker() -> None:
    text = PROMETHEUS.read_text()
    for worker in WORKERS:
        assert re.search(rf'"{re.escape(worker)}:\d+"', text), worker


def _promtool() -> str:
    """What ``make test`` took out of Debian's prometheus package, else one on the PATH."""
    promtool = PROMTOOL if PROMTOOL.exists() else shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"no promtool at {PROMTOOL} (`make test` fetches it) nor on the PATH")
    return str(promtool)


def test_prometheus_config_is_valid() -> None:
    done = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool parses PromQL in rule files; JSON is YAML, so each query becomes a rule
    exprs = [e.replace("$worker", ".*") for e in _dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))
    done = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- image -------------------------------------------------------------------------------


def test_dockerfile_builds_a_locked_non_root_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "pip install --require-hashes -r requirements.lock" in text
    assert "pip install --no-deps ." in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user, "the image must name its user"
    assert not user[-1].startswith(("root", "0")), "the image must not run as root"
    assert 'ENTRYPOINT ["tickwire"]' in text


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    lines = set((ROOT / ".dockerignore").read_text().split("\n"))
    assert "*" in lines, "the context is an allow-list"
    for excluded in (".venv", ".cache", ".stack", ".git", "**/.env"):
        assert excluded in lines, excluded
