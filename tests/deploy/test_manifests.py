"""The compose stack and the Kubernetes manifests describe a mesh that can really run: every
service command is a real `kvmesh` command whose flags its parser accepts, ports and addresses
agree, and the services are those `kvmesh up --prefill 1 --decode 1` starts.
(No Docker or Kubernetes here: the files are parsed, not run.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import kvstore.metrics
import router.metrics
import services.worker.metrics
from kvmesh.cli import SERVICES
from kvmesh.config import (
    KvStoreSettings,
    PlannerSettings,
    RouterSettings,
    ServiceSettings,
    WorkerSettings,
    add_settings_arguments,
    settings_from_namespace,
)
from kvmesh.launcher import LocalStack, StackOptions
from planner.connectors.kubernetes import KubernetesConnector
from planner.policy import Decision
from tests.planner.test_kubernetes import FakeApiServer, serving

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETTINGS = {"kvstore": KvStoreSettings, "router": RouterSettings, "worker": WorkerSettings,
            "planner": PlannerSettings}  # fmt: skip
METRIC_MODULES = (router.metrics, services.worker.metrics, kvstore.metrics)  # registered on import


def parse_command(args: list[str], env: dict[str, str]) -> ServiceSettings:
    """``kvmesh <service> <flags>`` as that service would parse it (flags, then KVMESH_* env)."""
    service, *argv = args
    assert service in SERVICES, f"{service!r} is not a kvmesh service command"
    parser = argparse.ArgumentParser(prog=f"kvmesh {service}", exit_on_error=False)
    add_settings_arguments(parser, SETTINGS[service])
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        pytest.fail(f"kvmesh {service} {' '.join(argv)}: {exc}")
    assert not unknown, f"kvmesh {service} does not accept {unknown}"
    return settings_from_namespace(SETTINGS[service], namespace, env)


def shape(settings: ServiceSettings) -> tuple[str, str]:
    return settings.kind, getattr(settings, "role", "")


def kvmesh_up_services(planner: bool = False) -> list[ServiceSettings]:
    """What `kvmesh up --prefill 1 --decode 1 [--planner]` starts, recorded instead of spawned."""
    modules = {module: name for name, module in SERVICES.items()}
    started: list[ServiceSettings] = []
    stack = LocalStack(StackOptions(prefill=1, decode=1, etcd_endpoint="etcd:2379", redis_url="redis://redis:6379/0",
                                    planner=planner))  # fmt: skip

    def record(name: str, instance_id: str, module: str, args: list[str], env: dict | None = None) -> None:
        started.append(parse_command([modules[module], "--instance-id", instance_id, *args], {}))

    stack.spawn = record  # type: ignore[method-assign]
    stack.start_services()
    return started


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.removeprefix("redis://").split("/")[0], int(port.split("/")[0])


# -- docker compose --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_kvmesh(compose: dict) -> dict[str, ServiceSettings]:
    return {name: parse_command(service["command"], {k: str(v) for k, v in service["environment"].items()})
            for name, service in compose["services"].items() if service.get("image", "").startswith("kvmesh")}


def test_compose_runs_the_services_kvmesh_up_starts(compose):
    ours = compose_kvmesh(compose)
    assert sorted(shape(s) for s in ours.values()) == sorted(shape(s) for s in kvmesh_up_services())
    assert {"etcd", "redis", "prometheus", "grafana", "jaeger"} <= set(compose["services"])


def test_compose_addresses_ports_and_dependencies_agree(compose):
    services = compose["services"]
    for name, settings in compose_kvmesh(compose).items():
        service = services[name]
        assert settings.advertise_host == name, "others must reach it by its compose name"
        assert settings.host == "0.0.0.0"
        etcd_host, etcd_port = host_port(settings.etcd_endpoint)
        assert etcd_host == "etcd" and f"http://etcd:{etcd_port}" in " ".join(services["etcd"]["command"])
        otlp_host, otlp_port = host_port(settings.otlp_endpoint)
        assert otlp_host in services and f"{otlp_port}:{otlp_port}" in services[otlp_host]["ports"]
        assert settings.trace_exporter == "otlp" and settings.metrics_port > 0
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{settings.port}", name
        assert service["depends_on"]["etcd" if "etcd" in service["depends_on"] else "kvstore"]["condition"] == (
            "service_healthy")
        for dependency in service["depends_on"]:
            assert dependency in services
        if isinstance(settings, KvStoreSettings):
            assert host_port(settings.redis_url) == ("redis", 6379)
        if isinstance(settings, RouterSettings):
            assert {f"{settings.http_port}:{settings.http_port}", f"{settings.port}:{settings.port}"} <= set(
                service["ports"])


def test_prometheus_scrapes_every_kvmesh_service_on_its_metrics_port(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{name}:{s.metrics_port}" for name, s in compose_kvmesh(compose).items()}
    assert targets == expected
    volume = compose["services"]["prometheus"]["volumes"][0]
    assert volume.startswith("./prometheus/prometheus.yml:") and volume.split(":")[1] in " ".join(
        compose["services"]["prometheus"]["command"])


def defined_metric_names() -> set[str]:
    names = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for collector in list(REGISTRY._collector_to_names):  # every family, even those without samples yet
        for family in getattr(collector, "describe", lambda: [])():
            names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return names


def test_grafana_dashboards_are_provisioned_and_query_real_metrics(compose):
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kvmesh.yml").read_text())
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    defined = defined_metric_names()
    titles = set()
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        titles.add(dashboard["title"])
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                used = set(re.findall(r"kvmesh_[a-z0-9_]+", target["expr"]))
                assert used and used <= defined, f"{path.name} {panel['title']}: {used - defined}"
    assert len(titles) == 4, titles


# -- kubernetes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]  # fmt: skip


def container_env(container: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "10.0.0.1")  # valueFrom (the pod IP) resolved at run time
    return env


def test_k8s_deployments_run_the_services_kvmesh_up_starts_with_grpc_probes(k8s):
    config_maps = {d["metadata"]["name"]: d["data"] for d in k8s if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Service"}
    ours = []
    for deployment in (d for d in k8s if d["kind"] == "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        if not container["image"].startswith("kvmesh"):
            continue
        settings = parse_command(container["args"], container_env(container, config_maps))
        ours.append(shape(settings))
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == settings.port, (deployment["metadata"]["name"], probe)
        assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
        ports = {p["containerPort"] for p in container["ports"]}
        assert {settings.port, settings.metrics_port} <= ports
        assert host_port(settings.etcd_endpoint)[0] in services
        if isinstance(settings, KvStoreSettings):
            assert host_port(settings.redis_url)[0] in services
        if isinstance(settings, RouterSettings):
            assert settings.http_port in ports
            router_ports = {p["targetPort"] for p in services["router"]["spec"]["ports"]}
            assert router_ports == {settings.http_port, settings.port}
    # Separate Deployments for prefill and decode, the planner, and nothing kvmesh up would not start.
    assert sorted(ours) == sorted(shape(s) for s in kvmesh_up_services(planner=True))


def k8s_planner(k8s: list[dict]) -> tuple[dict, PlannerSettings]:
    """The planner's Deployment and its command as `kvmesh planner` parses it."""
    config_maps = {d["metadata"]["name"]: d["data"] for d in k8s if d["kind"] == "ConfigMap"}
    (deployment,) = [d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "planner"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = parse_command(container["args"], container_env(container, config_maps))
    assert isinstance(settings, PlannerSettings)
    return deployment, settings


def test_k8s_planner_scales_the_prefill_and_decode_deployments(k8s):
    _, settings = k8s_planner(k8s)
    assert settings.connector == "kubernetes" and not settings.dry_run
    roles = {}
    for deployment in (d for d in k8s if d["kind"] == "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        args = container.get("args", [])
        if args[:1] == ["worker"]:
            roles[deployment["metadata"]["name"]] = args[args.index("--role") + 1]
    assert roles[settings.prefill_deployment] == "prefill" and roles[settings.decode_deployment] == "decode"


def _allowed(k8s: list[dict], service_account: str) -> set[tuple[str, str, str, str]]:
    """(verb, api group, resource, name) the Roles bound to ``service_account`` grant."""
    bound = {b["roleRef"]["name"] for b in k8s if b["kind"] == "RoleBinding"
             if {"kind": "ServiceAccount", "name": service_account} in b["subjects"]}  # fmt: skip
    return {(verb, group, resource, name)
            for role in k8s if role["kind"] == "Role" and role["metadata"]["name"] in bound
            for rule in role["rules"] for verb in rule["verbs"] for group in rule["apiGroups"]
            for resource in rule["resources"] for name in rule["resourceNames"]}  # fmt: skip


async def test_k8s_planner_rbac_covers_every_request_the_connector_makes(k8s, tmp_path):
    """The connector, configured as the manifest's planner is, against a fake API server: each
    request it makes for a switch, an add and a remove is one the planner's ServiceAccount may make."""
    deployment, settings = k8s_planner(k8s)
    service_account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == service_account for d in k8s)
    allowed = _allowed(k8s, service_account)
    with serving(FakeApiServer()) as api:
        connector = KubernetesConnector(dataclasses.replace(
            settings, k8s_api_url=f"http://127.0.0.1:{api.server_port}", k8s_namespace="kv",
            k8s_token_file=str(tmp_path / "token"), k8s_ca_file=""))  # fmt: skip
        for decision in (Decision("switch", "prefill", "", ("d-0",)), Decision("switch", "decode", "", ("p-0",)),
                         Decision("add", "decode", ""), Decision("remove", "prefill", "", ("p-1",))):  # fmt: skip
            await connector.apply(decision)
    made = set()
    for method, path, *_ in api.requests:
        match = re.fullmatch(r"/apis/(\w+)/v1/namespaces/kv/deployments/([\w-]+)/scale", path)
        assert match, path
        made.add(({"GET": "get", "PATCH": "patch"}[method], match[1], "deployments/scale", match[2]))
    assert made and made <= allowed, made - allowed
    assert {name for *_, name in made} == {settings.prefill_deployment, settings.decode_deployment}
