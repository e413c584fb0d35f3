"""Deployment files checked offline: compose schema, required settings, metric names, Dockerfile."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from ruamel.yaml import YAML

from faissq.telemetry.metric_families import make_metrics, metric_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "faissq.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
METRIC = re.compile(r"\b(faissq_[a-z0-9_]+|flower_[a-z0-9_]+)")


def load_yaml(path: Path) -> Any:
    """Parse a YAML file safely (no tags, no code)."""
    return YAML(typ="safe", pure=True).load(path.read_text())


def compose() -> dict[str, Any]:
    """docker-compose.yml as data."""
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_file_validates_with_the_check_jsonschema_command() -> None:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*cmd, str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_redis_is_durable_and_never_evicts() -> None:
    redis = compose()["services"]["redis"]
    args = " ".join(redis["command"])
    assert "--appendonly yes" in args and "--appendfsync everysec" in args
    assert "--maxmemory-policy noeviction" in args
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_worker_reserves_a_gpu_shares_snapshots_and_shuts_down_softly() -> None:
    services = compose()["services"]
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "snapshots:/data" in worker["volumes"]
    assert worker["environment"]["FAISSQ_STORAGE__URL"] == "/data"
    assert worker["healthcheck"]["test"][1:] == ["python", "-m", "faissq.telemetry.healthcheck"]
    assert worker["stop_signal"] == "SIGTERM" and worker["stop_grace_period"]
    assert worker["environment"]["FAISSQ_METRICS__PORT"] == "9310"
    flower = services["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "--persistent=True" in flower["command"]
    assert any(v.endswith(":/flower") for v in flower["volumes"])
    declared = set(compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
            else:
                assert source in declared, source


def test_prometheus_scrapes_the_worker_metrics_port_and_flower() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = int(compose()["services"]["worker"]["environment"]["FAISSQ_METRICS__PORT"])
    assert jobs["faissq-worker"]["dns_sd_configs"][0]["port"] == port
    assert jobs["faissq-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


def dashboard_exprs() -> list[str]:
    """Every PromQL expression and template query of the Grafana dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"]]
    return exprs


def test_every_metric_in_the_dashboard_and_prometheus_config_exists() -> None:
    known = metric_names(make_metrics())
    flower_src = (resources.files("flower") / "events.py").read_text()
    used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    used |= set(METRIC.findall(PROMETHEUS.read_text()))
    needed = {"faissq_search_latency_seconds_bucket", "faissq_searches_total",
              "faissq_rpc_queue_depth", "faissq_index_vectors", "faissq_jobs_total"}  # fmt: skip
    assert needed <= used
    for name in used:
        if name.startswith("flower_"):
            assert f"'{name}'" in flower_src, f"{name} is not a Flower metric"
        else:
            assert name in known, f"{name} is not defined in faissq/telemetry/metric_families.py"


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    source = load_yaml(prov / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = load_yaml(prov / "dashboards" / "faissq.yml")["providers"][0]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


def test_dockerfile_installs_exactly_what_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    text = "\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))
    installs = re.findall(r"pip install ([^;&\\\n]+)", text)
    assert installs, "no pip install in the Dockerfile"
    extras = project["optional-dependencies"]
    gpu_names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0] for d in extras["gpu"]}
    for args in installs:
        targets = [t.strip("\"'") for t in args.split() if not t.startswith("-")]
        for target in targets:
            if target == "$GPU_WHEEL":  # the faiss-gpu wheel the gpu extra resolved to
                wheel = re.search(r'GPU_WHEEL="([a-z0-9-]+)==\$\(pip show ([a-z0-9-]+)', text)
                assert wheel and wheel.group(1) == wheel.group(2) and wheel.group(1) in gpu_names
                continue
            match = re.fullmatch(r"\.(?:\[([a-z,]+)\])?", target)
            assert match, f"the Dockerfile installs {target!r}, not the project"
            assert set(filter(None, (match.group(1) or "").split(","))) <= set(extras)
    assert "ARG VARIANT" in text and "COPY pyproject.toml" in text


def test_every_party_logs_in_as_its_role_with_a_password_from_the_environment() -> None:
    services = compose()["services"]
    assert "/acl/users.acl" in services["redis"]["command"]
    script = services["redis-acl"]["command"][-1]
    assert 'echo "user default off"' in script and "faissq acl --role" in script
    for name, user in (("worker", "worker"), ("worker-replica", "worker"), ("flower", "flower")):
        url = services[name]["environment"]["FAISSQ_REDIS__URL"]
        assert url.startswith(f"redis://faissq-{user}:${{FAISSQ_{user.upper()}_REDIS_PASSWORD"), url
    # a URL with a literal password (anything but a ${...} reference) must never be committed
    assert not re.search(r"redis://[\w-]*:(?!\$\{)[^@\s]+@", COMPOSE.read_text())
