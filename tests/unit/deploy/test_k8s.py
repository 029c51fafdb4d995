"""deploy/k8s: every overlay renders offline with ``kubectl kustomize``, every object validates against the
Kubernetes schemas (strict: unknown fields fail), and the objects agree with each other and with the server:
probes, ports, drain timing, settings, selectors, the HPA's metric, the dashboard and Envoy's affinity hashing."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from loraplex.client.affinity import AFFINITY_HEADER
from loraplex.server.config import Settings
from loraplex.server.routing.routes import route_from_spec
from loraplex.server.routing.routes_file import parse as parse_routes
from loraplex.server.routing.store import RouteStore
from tests.support.deploy.files import (
    DEPLOY,
    K8S,
    Manifest,
    container,
    effective_settings,
    find,
    image_env,
    kustomize,
)

# Native gRPC probes are GA since 1.27: validate against it and against the newest schemas the package knows.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Custom resources have no schema in kubernetes-validate; test_custom_resources and the inference-gateway test
# check their structure instead.
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
COMPONENTS = ("adapter-sync", "inference-gateway")  # each rendered on top of the cpu overlay
OVERLAYS = {"cpu": "cpu", "gpu": "cuda"}  # overlay → image variant
SERVER_LABELS = {"app.kubernetes.io/name": "loraplex", "app.kubernetes.io/component": "server"}
DRAIN_MARGIN_S = 5  # after the drain: the gRPC server's stop grace (1 s) and the engine thread's stop


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    """Each overlay, plus the cpu overlay with each optional component, rendered once."""
    objects = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    for component in COMPONENTS:
        overlay = tmp_path_factory.mktemp("overlay")
        (overlay / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    # kustomize wants relative paths
                    "resources": [os.path.relpath(K8S / "overlays" / "cpu", overlay)],
                    "components": [os.path.relpath(K8S / "components" / component, overlay)],
                }
            )
        )
        objects[f"cpu+{component}"] = kustomize(overlay)
    return objects


def server_of(objects: list[Manifest]) -> Manifest:
    return container(find(objects, "Deployment", "loraplex"), "server")


def settings_of(objects: list[Manifest], overlay: str, scratch: Path) -> Settings:
    """What the server pod's settings come to: the ConfigMap's config.yaml, the image's and the container's env."""
    config = find(objects, "ConfigMap", "loraplex-config")["data"]["config.yaml"]
    env = {**image_env(OVERLAYS[overlay]), **{e["name"]: e["value"] for e in server_of(objects).get("env", [])}}
    return effective_settings(config, env, scratch)


def mount_of(objects: list[Manifest], volume_kind: str, name: str) -> dict[str, Any]:
    """The server's mount of the pod volume whose ``volume_kind`` source names ``name``."""
    pod = find(objects, "Deployment", "loraplex")["spec"]["template"]["spec"]
    volumes = [v["name"] for v in pod["volumes"] if name in json.dumps(v.get(volume_kind, {}))]
    mounts = [m for m in server_of(objects)["volumeMounts"] if m["name"] in volumes]
    assert len(mounts) == 1, f"the server mounts no {volume_kind} {name}"
    return dict(mounts[0])


def port_named(spec: Manifest, name: str) -> int:
    ports = [p["containerPort"] for p in spec["ports"] if p["name"] == name]
    assert ports, f"no port named {name}"
    return int(ports[0])


@pytest.mark.parametrize("overlay", ["cpu", "gpu", *(f"cpu+{component}" for component in COMPONENTS)])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], overlay: str, version: str
) -> None:
    kinds = set()
    for obj in rendered[overlay]:
        kinds.add(obj["kind"])
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error.message} at {list(error.path)}")
    expected = {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget"}
    assert expected | {"HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds


def test_custom_resources(rendered: dict[str, list[Manifest]]) -> None:
    """The ServiceMonitor: the fields the Prometheus Operator reads, pointing at the server pods' metrics port."""
    objects = rendered["cpu"]
    monitor = find(objects, "ServiceMonitor", "loraplex")
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    service = find(objects, "Service", "loraplex-replicas")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_probes_are_native_grpc_health_on_the_server_port(
    rendered: dict[str, list[Manifest]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    server = server_of(objects)
    settings = settings_of(objects, overlay, tmp_path).server
    port = settings.port
    assert port_named(server, "grpc") == port and port_named(server, "http") == settings.http_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": port}, probe  # service "": the server as a whole
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "the start-up probe covers model loading"


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_termination_grace_covers_the_prestop_pause_and_the_drain(
    rendered: dict[str, list[Manifest]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    pod = find(objects, "Deployment", "loraplex")["spec"]["template"]["spec"]
    command = server_of(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = settings_of(objects, overlay, tmp_path).server.grace_period_s
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain + DRAIN_MARGIN_S


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_pods_settings_are_valid_and_match_the_pod(
    rendered: dict[str, list[Manifest]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    settings = settings_of(objects, overlay, tmp_path)
    server = server_of(objects)
    assert settings.server.host == "0.0.0.0"
    assert port_named(server, "metrics") == settings.server.metrics_port
    assert settings.adapters.roots == (
        Path(mount_of(objects, "persistentVolumeClaim", "loraplex-adapters")["mountPath"]),
    )
    tokens = mount_of(objects, "secret", "loraplex-tokens")
    assert settings.auth.tokens_file is not None and settings.auth.tokens_file.parent == Path(tokens["mountPath"])
    config = mount_of(objects, "configMap", "loraplex-config")
    assert config["readOnly"] and server["args"] == ["--config", f"{config['mountPath']}/config.yaml"]
    parse_routes(find(objects, "ConfigMap", "loraplex-config")["data"]["routes.yaml"], "routes.yaml")
    assert mount_of(objects, "persistentVolumeClaim", "loraplex-adapters")["readOnly"]


def holding_mount(spec: Manifest, path: Path) -> dict[str, Any]:
    """The mount of container ``spec`` under which ``path`` lies (the deepest one)."""
    holding = [m for m in spec["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert holding, f"{spec['name']} mounts nothing holding {path}"
    return dict(max(holding, key=lambda m: len(m["mountPath"])))


def run_seed(seed: Manifest, env: dict[str, str]) -> None:
    """The seed-routes init container's command, run here with its paths pointed at local directories."""
    done = subprocess.run(
        seed["command"], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_routes_file_is_writable_and_seeded_from_the_configmap(
    rendered: dict[str, list[Manifest]], overlay: str, tmp_path: Path
) -> None:
    """SetRoute/DeleteRoute rewrite routing.routes_file atomically (temporary file + rename in its directory), which
    a ConfigMap mount forbids: the file lies on a writable emptyDir that an init container seeds from the ConfigMap's
    routes.yaml, once per pod (a restarted pod sandbox keeps the routes changed through the API)."""
    objects = rendered[overlay]
    deployment = find(objects, "Deployment", "loraplex")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    server = server_of(objects)
    routes_path = settings_of(objects, overlay, tmp_path).routing.routes_file
    assert routes_path is not None
    state = holding_mount(server, routes_path)
    assert not state.get("readOnly") and "emptyDir" in volumes[state["name"]], "the routes file is writable"
    config = mount_of(objects, "configMap", "loraplex-config")
    assert not routes_path.is_relative_to(config["mountPath"])

    seed = container(deployment, "seed-routes", init=True)
    assert seed["image"] == server["image"]  # no other image to pull
    env = {e["name"]: e["value"] for e in seed["env"]}
    assert Path(env["ROUTES"]) == routes_path
    assert holding_mount(seed, routes_path) == {"name": state["name"], "mountPath": state["mountPath"]}
    seed_config = holding_mount(seed, Path(env["SEED"]))
    assert seed_config["name"] == config["name"] and seed_config["readOnly"]
    assert Path(env["SEED"]).relative_to(seed_config["mountPath"]) == Path("routes.yaml")

    # The command itself, on local stand-ins for the two volumes.
    shipped = find(objects, "ConfigMap", "loraplex-config")["data"]["routes.yaml"]
    (tmp_path / "configmap").mkdir()
    (tmp_path / "configmap" / "routes.yaml").write_text(shipped)
    (tmp_path / "state").mkdir()
    local = {"SEED": str(tmp_path / "configmap" / "routes.yaml"), "ROUTES": str(tmp_path / "state" / "routes.yaml")}
    run_seed(seed, local)
    assert Path(local["ROUTES"]).read_text() == shipped
    store = RouteStore.open(Path(local["ROUTES"]), max_routes=10)  # what the server opens at start-up
    store.set(route_from_spec("support-bot", {"variants": [{"name": "v1", "adapter": "a", "weight": 100}]}))
    run_seed(seed, local)  # the pod sandbox restarts: the change made through the API stays
    assert set(parse_routes(Path(local["ROUTES"]).read_text(), "routes.yaml")) == {"support-bot"}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["routes.yaml"]  # no temporary file left


def test_the_gpu_overlay_asks_for_a_gpu_and_loads_an_nf4_base_from_its_volume(
    rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    objects = rendered["gpu"]
    settings = settings_of(objects, "gpu", tmp_path)
    assert (settings.model.device, settings.model.quantization) == ("cuda", "nf4")
    models = mount_of(objects, "persistentVolumeClaim", "loraplex-models")
    assert Path(settings.model.base_model).is_relative_to(models["mountPath"])
    server = server_of(objects)
    assert server["image"].endswith(":cuda")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    find(objects, "PersistentVolumeClaim", "loraplex-models")
    assert server_of(rendered["cpu"])["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in server_of(rendered["cpu"])["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", [*OVERLAYS, "cpu+inference-gateway"])
def test_selectors_and_ports_connect(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    objects = rendered[overlay]
    pods = {d["metadata"]["name"]: d for d in objects if d["kind"] == "Deployment"}

    def selected(selector: dict[str, str]) -> list[Manifest]:
        return [d for d in pods.values() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    for service in (o for o in objects if o["kind"] == "Service"):
        (deployment,) = selected(service["spec"]["selector"])
        (spec,) = deployment["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            assert port_named(spec, port["targetPort"]) == port["port"], (service["metadata"]["name"], port)
    for budget in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        assert len(selected(budget["spec"]["selector"]["matchLabels"])) == 1
    assert selected(find(objects, "Service", "loraplex-replicas")["spec"]["selector"]) == [pods["loraplex"]]
    assert find(objects, "Service", "loraplex-replicas")["spec"]["clusterIP"] == "None"  # one DNS record per pod
    assert {p["name"] for p in find(objects, "Service", "loraplex-replicas")["spec"]["ports"]} >= {"grpc", "http"}
    assert selected(find(objects, "Service", "loraplex")["spec"]["selector"]) == [pods["loraplex-envoy"]]


def test_the_hpa_scales_the_server_on_waiting_requests_through_prometheus_adapter(
    rendered: dict[str, list[Manifest]],
) -> None:
    hpa = find(rendered["cpu"], "HorizontalPodAutoscaler", "loraplex")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "loraplex"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "loraplex_waiting_requests"
    assert find(rendered["gpu"], "HorizontalPodAutoscaler", "loraplex")["spec"]["maxReplicas"] == 4
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    (rule,) = rules
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith("loraplex_waiting_requests{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    exposition = (DEPLOY.parent / "server" / "observability" / "metrics.py").read_text()
    assert '"loraplex_waiting_requests"' in exposition, "the server exports the metric the HPA scales on"


def test_the_inference_pool_routes_to_the_server_pods_http_api_through_an_endpoint_picker_on_our_metrics(
    rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    """The Gateway API Inference Extension component: the fields the Gateway and the endpoint picker read."""
    objects = rendered["cpu+inference-gateway"]
    pool = find(objects, "InferencePool", "loraplex")["spec"]
    server_pod = find(objects, "Deployment", "loraplex")["spec"]["template"]["metadata"]["labels"]
    epp = find(objects, "Deployment", "loraplex-epp")
    assert pool["selector"]["matchLabels"].items() <= server_pod.items()
    assert not pool["selector"]["matchLabels"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    settings = settings_of(objects, "cpu", tmp_path).server
    assert pool["targetPorts"] == [{"number": settings.http_port}]  # the OpenAI API, where `model` is read
    picker = pool["endpointPickerRef"]
    assert set(picker) <= {"group", "kind", "name", "port", "failureMode"} and picker["failureMode"] == "FailClose"
    service = find(objects, "Service", picker["name"])
    assert picker["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}

    args = container(epp, "epp")["args"]
    documented = re.findall(r"^  - (--\S+)$", (DEPLOY / "inference-gateway.md").read_text(), re.MULTILINE)
    assert documented and set(documented) <= set(args), "the picker runs with the flags the doc names"
    assert f"--model-server-metrics-port={settings.metrics_port}" in args
    config_file = next(a.partition("=")[2] for a in args if a.startswith("--config-file="))
    config_map = find(objects, "ConfigMap", "loraplex-epp")
    mount = mount_of_container(epp, "epp", config_map["metadata"]["name"])
    assert Path(config_file).parent == Path(mount) and Path(config_file).name in config_map["data"]
    picker_config = yaml.safe_load(config_map["data"][Path(config_file).name])
    assert picker_config["kind"] == "EndpointPickerConfig"
    declared = {plugin["type"] for plugin in picker_config["plugins"]}
    assert "lora-affinity-scorer" in declared
    for profile in picker_config["schedulingProfiles"]:
        assert {ref["pluginRef"] for ref in profile["plugins"]} <= declared

    rules = find(objects, "Role", "loraplex-epp")["rules"]
    assert any(r["apiGroups"] == ["inference.networking.k8s.io"] and "inferencepools" in r["resources"] for r in rules)
    assert any(r["apiGroups"] == [""] and r["resources"] == ["pods"] and "watch" in r["verbs"] for r in rules)
    binding = find(objects, "RoleBinding", "loraplex-epp")
    assert binding["subjects"][0]["name"] == epp["spec"]["template"]["spec"]["serviceAccountName"]
    (rule,) = find(objects, "HTTPRoute", "loraplex")["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraplex"}


def mount_of_container(deployment: Manifest, name: str, config_map: str) -> str:
    """The mount path at which container ``name`` of ``deployment`` mounts the ConfigMap ``config_map``."""
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map]
    (path,) = [m["mountPath"] for m in container(deployment, name)["volumeMounts"] if m["name"] == volume]
    return str(path)


def test_the_dashboard_configmap_is_the_grafana_dashboard(rendered: dict[str, list[Manifest]]) -> None:
    dashboard = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
    for objects in rendered.values():
        config_map = find(objects, "ConfigMap", "loraplex-grafana-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["data"] == {"loraplex.json": dashboard.read_text()}
        assert json.loads(config_map["data"]["loraplex.json"])["uid"]


def test_the_adapter_sync_component_fills_the_adapters_volume_before_the_server_starts(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["cpu+adapter-sync"]
    deployment = find(objects, "Deployment", "loraplex")
    sync = container(deployment, "adapter-sync", init=True)
    server_mount = mount_of(objects, "persistentVolumeClaim", "loraplex-adapters")
    (sync_mount,) = [m for m in sync["volumeMounts"] if m["name"] == server_mount["name"]]
    assert not sync_mount.get("readOnly") and server_mount["readOnly"]
    assert sync["args"][-1] == sync_mount["mountPath"] and sync["args"][0] == "copy"  # never deletes
    cpu = find(rendered["cpu"], "Deployment", "loraplex")["spec"]["template"]["spec"]
    assert [c["name"] for c in cpu["initContainers"]] == ["seed-routes"]
    init = {c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]}
    assert init == {"seed-routes", "adapter-sync"}  # independent of each other: any order


# ---------------------------------------------------------------------------------------------------------- Envoy


@pytest.fixture(scope="module")
def envoy(rendered: dict[str, list[Manifest]]) -> dict[str, Any]:
    config = find(rendered["cpu"], "ConfigMap", "loraplex-envoy")["data"]["envoy.yaml"]
    return dict(yaml.safe_load(config))


def walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            walk(value, visit)


def test_envoy_hashes_the_affinity_header_consistently_over_the_server_pods(
    envoy: dict[str, Any], rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    cluster = clusters["loraplex"]
    assert cluster["lb_policy"] in {"RING_HASH", "MAGLEV"}
    assert cluster["type"] == "STRICT_DNS"  # every ready pod behind the headless Service is an endpoint
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] == find(rendered["cpu"], "Service", "loraplex-replicas")["metadata"]["name"]
    assert address["port_value"] == settings_of(rendered["cpu"], "cpu", tmp_path).server.port
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC upstream
    assert "grpc_health_check" in cluster["health_checks"][0]
    (listener,) = [x for x in envoy["static_resources"]["listeners"] if x["name"] == "grpc"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == "loraplex"
    assert route["route"]["hash_policy"] == [{"header": {"header_name": AFFINITY_HEADER}}]
    assert route["route"]["timeout"] == "0s", "no route timeout: long generations are bounded by their deadlines"
    retried = set(route["route"]["retry_policy"]["retry_on"].split(","))
    assert "unavailable" in retried and "connect-failure" in retried
    assert not retried & {"reset", "5xx", "gateway-error"}, "in-flight requests are the client's to retry"
    proxy = container(find(rendered["cpu"], "Deployment", "loraplex-envoy"), "envoy")
    assert port_named(proxy, "grpc") == listener["address"]["socket_address"]["port_value"]
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_envoy_config_is_well_formed(envoy: dict[str, Any]) -> None:
    """Without an Envoy binary: typed configs name v3 Envoy types, filter chains end with the router."""
    types: list[str] = []
    walk(envoy, lambda node: types.extend([node["@type"]] if "@type" in node else []))
    assert types and all(t.startswith("type.googleapis.com/envoy.") and ".v3." in t for t in types)
    for listener in envoy["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]
        assert manager["name"] == "envoy.filters.network.http_connection_manager"
        assert manager["typed_config"]["http_filters"][-1]["name"] == "envoy.filters.http.router"
        cluster_names = {c["name"] for c in envoy["static_resources"]["clusters"]}
        for host in manager["typed_config"]["route_config"]["virtual_hosts"]:
            assert {r["route"]["cluster"] for r in host["routes"]} <= cluster_names
