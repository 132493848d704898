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
from prometheus_client import CollectorRegistry

from contracts.streams import consumer_specs
from workers.candle_ingest import app as candle_ingest_app
from workers.cli import WORKERS
from workers.feature_builder import app as feature_builder_app
from workers.model_scorer import app as model_scorer_app
from workers.signal_publisher import app as signal_publisher_app
from workers.timescale_replicator import app as replicator_app
from workers.trainer.scheduler import SchedulerMetrics

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
    "tickwire_replication_lag_seconds",
    "tickwire_replication_lag_messages",
    "tickwire_scheduler_runs_total",
    "tickwire_scheduler_leader",
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


def _registries() -> dict[str, CollectorRegistry]:
    """Each worker's registry, made by the code that makes it when the worker runs."""
    pipeline = {
        "candle-ingest": candle_ingest_app,
        "feature-builder": feature_builder_app,
        "model-scorer": model_scorer_app,
        "signal-publisher": signal_publisher_app,
    }
    out = {name: app.build(app.Settings()).metrics.registry for name, app in pipeline.items()}
    dsn = "postgresql://unused@127.0.0.1/unused"  # built, never connected
    out["timescale-replicator"] = replicator_app.Replicator(
        replicator_app.Settings(postgres_dsn=dsn)
    ).metrics.registry
    out["scheduler"] = SchedulerMetrics().registry
    return out


# Labels Prometheus gives every series of a scrape.
SCRAPE_LABELS = {"job", "instance"}


def _target_labels() -> set[str]:
    """The labels infra/prometheus.yml gives its targets."""
    return set(re.findall(r"^\s+labels:\s*\n\s+(\w+):", PROMETHEUS.read_text(), re.M))


def _exported() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series name served, with its family's type and label names (``up`` included)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    scrape = frozenset(SCRAPE_LABELS | _target_labels())
    out: dict[str, tuple[str, frozenset[str]]] = {"up": ("gauge", scrape)}
    for worker, registry in _registries().items():
        for collector in registry._collector_to_names:  # every metric, with or without samples
            kind, labels = collector._type, frozenset(collector._labelnames) | scrape
            for suffix in suffixes[kind]:
                name = collector._name + suffix
                have = labels | {"le"} if suffix == "_bucket" else labels
                assert out.get(name, (kind, have)) == (kind, have), f"{name} differs in {worker}"
                out[name] = (kind, have)
    return out


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, those inside a collapsed row too."""
    return [q for p in panels for q in [p, *_panels(p.get("panels", []))]]


def _dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"], t.get("legendFormat", ""))
        for p in _panels(dashboard["panels"])
        for t in p.get("targets", [])
    ]


def _dashboard_exprs() -> list[str]:
    return [expr for _, expr, _ in _dashboard_targets()]


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()", without_labels))
    return {w for w in words if w.startswith("tickwire_") or w == "up"}


def _query_problems(
    expr: str, legend: str, exported: dict[str, tuple[str, frozenset[str]]]
) -> list[str]:
    """What in one query names a series or label nothing serves, or does wrong math."""
    problems = [f"no such series {n}" for n in sorted(_metric_names(expr)) if n not in exported]
    names = [n for n in _metric_names(expr) if n in exported]
    labels = frozenset().union(*(exported[n][1] for n in names))
    for name, matchers in re.findall(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}", expr):
        if name in exported:
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                if label not in exported[name][1]:
                    problems.append(f"{name} has no label {label}")
    groupings = {
        (how, frozenset(g.strip() for g in group.split(",") if g.strip()))
        for how, group in re.findall(r"\b(by|without)\s*\(([^)]*)\)", expr)
    }
    for _, group in groupings:
        problems += [f"no series here has a label {g}" for g in sorted(group - labels)]
    by = [group for how, group in groupings if how == "by"]
    kept = set(frozenset.intersection(*by) - {"le"}) if by else set(labels)
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        if label not in kept:
            problems.append(f"legend {{{{{label}}}}}: not a label of the result")
    for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*([a-z_][a-z0-9_]*)", expr):
        if name in exported and exported[name][0] == "gauge":
            problems.append(f"{fn}() of the gauge {name}")
    for inner in re.findall(r"histogram_quantile\(\s*[0-9.]+\s*,(.*)", expr):
        buckets = re.findall(r"\b([a-z_][a-z0-9_]*)_bucket\b", inner)
        by = re.match(r"\s*sum\s+by\s*\(([^)]*)\)\s*\(\s*rate\(", inner)
        if not buckets or by is None or "le" not in {g.strip() for g in by.group(1).split(",")}:
            problems.append("histogram_quantile over anything but sum by (le, ...) (rate(_bucket))")
    return problems


def test_dashboard_queries_name_what_the_workers_export() -> None:
    exported = _exported()
    problems = [
        f"{title}: {expr}: {problem}"
        for title, expr, legend in _dashboard_targets()
        for problem in _query_problems(expr, legend, exported)
    ]
    assert problems == []


def test_dashboard_variables_name_what_the_workers_export() -> None:
    exported = _exported()
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert variables
    for variable in variables:
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert found is not None, query
        assert found[2] in exported[found[1]][1], query


def test_the_dashboard_check_catches_a_wrong_name_label_or_rate() -> None:
    exported = _exported()
    good = "sum by (worker, reason) (rate(tickwire_dead_letters_total[5m]))"
    assert _query_problems(good, "{{worker}} {{reason}}", exported) == []
    wrong = {
        "sum by (worker) (rate(tickwire_dead_letters[5m]))": "{{worker}}",  # no _total
        'sum by (worker) (rate(tickwire_dead_letters_total{stage="x"}[5m]))': "{{worker}}",
        "sum by (worker, stage) (rate(tickwire_dead_letters_total[5m]))": "{{stage}}",
        "sum by (worker) (rate(tickwire_dead_letters_total[5m]))": "{{reason}}",
        "sum by (worker) (rate(tickwire_consumer_pending[5m]))": "{{worker}}",
        "histogram_quantile(0.5, sum by (worker) (rate(tickwire_batch_size_bucket[5m])))": "",
        "histogram_quantile(0.5, rate(tickwire_batch_size_bucket[5m]))": "",
    }
    for expr, legend in wrong.items():
        assert _query_problems(expr, legend, exported), expr


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


def _panel_exprs(title: str) -> list[str]:
    exprs = [expr for t, expr, _ in _dashboard_targets() if t == title]
    assert exprs, f"no panel {title!r}"
    return [e.replace("$worker", ".*") for e in exprs]


def test_workers_up_says_down_when_one_instance_of_a_worker_is(tmp_path: Path) -> None:
    # evaluated by Prometheus' own engine (promtool test rules): two instances of
    # candle-ingest (partitions), one of them connected but not consuming
    [expr] = _panel_exprs("Workers up")
    series = {
        'tickwire_up{worker="candle-ingest", instance="ci-0:9101"}': "1x5",
        'tickwire_up{worker="candle-ingest", instance="ci-1:9101"}': "0x5",
        'tickwire_up{worker="feature-builder", instance="fb-0:9102"}': "1x5",
    }
    test = {
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "promql_expr_test": [{"expr": expr, "eval_time": "4m", "exp_samples": [
                {"labels": '{worker="candle-ingest"}', "value": 0},
                {"labels": '{worker="feature-builder"}', "value": 1},
            ]}],
        }]
    }  # fmt: skip
    path = tmp_path / "test.yml"
    path.write_text(json.dumps(test))
    done = subprocess.run(
        [_promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
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
