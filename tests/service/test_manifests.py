"""service/Dockerfile and service/kubernetes/*.yaml agree with the real CLI and with each other: every flag
parses, the probes ask the ports and health services the server has, the pod outlasts the drain, and the
clients' service config names real services. (No container runs here: this reads them.)"""

import json
import shlex
from pathlib import Path

import pytest

from mistral_grpc.cli import build_parser
from mistral_grpc.server import app

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "service"


def dockerfile_instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage, continuation lines joined, comments dropped."""
    text = (SERVICE / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages[stage]


def instruction(name: str) -> str:
    [arguments] = [arguments for found, arguments in dockerfile_instructions() if found == name]
    return arguments


@pytest.fixture(scope="module")
def deployment() -> dict:
    return yaml.safe_load((SERVICE / "kubernetes" / "deployment.yaml").read_text())


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def serve_args(container):
    """The flags the pod runs with: the image's ENTRYPOINT, then the container's args, parsed by the real CLI."""
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    assert entrypoint[0].endswith("/mistral-grpc") and entrypoint[1] == "serve"
    return build_parser().parse_args(entrypoint[1:] + container.get("args", []))


def test_image_runs_as_a_non_root_user_on_a_cuda_runtime_base(deployment):
    assert instruction("FROM").startswith("nvidia/cuda:") and "-runtime-" in instruction("FROM")
    uid = int(instruction("USER"))
    assert uid != 0
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] and pod_security["runAsUser"] == uid


def test_exposed_and_container_ports_are_the_served_ones(serve_args, container, deployment):
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": serve_args.port, "metrics": serve_args.metrics_port}
    assert sorted(map(int, instruction("EXPOSE").split())) == sorted(ports.values())
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == serve_args.metrics_port


def test_docker_healthcheck_runs_the_healthcheck_module_on_the_grpc_port(serve_args):
    options, _, command = instruction("HEALTHCHECK").partition("CMD")
    python, script, target = json.loads(command)
    assert target == f"127.0.0.1:{serve_args.port}"
    copies = [shlex.split(arguments) for name, arguments in dockerfile_instructions() if name == "COPY"]
    assert ["python/mistral_grpc/server/healthcheck.py", script] in copies
    assert (REPO / "python/mistral_grpc/server/healthcheck.py").is_file() and python == "/opt/venv/bin/python"


def test_probes_ask_grpc_health_for_readiness_and_liveness(serve_args, container):
    for probe in ("startupProbe", "readinessProbe"):  # NOT_SERVING while loading and draining
        assert container[probe]["grpc"]["port"] == serve_args.port
        assert container[probe]["grpc"].get("service", "") in ("", app.CHAT_SERVICE)
    liveness = container["livenessProbe"]["grpc"]
    assert liveness == {"port": serve_args.port, "service": app.LIVENESS_SERVICE}


def test_the_pod_outlasts_the_drain(serve_args, container, deployment):
    pre_stop_command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop_command[0] == "/bin/sleep"
    pre_stop = float(pre_stop_command[1])
    termination_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The pod's grace counts from the preStop hook; after the drain the server takes _STOP_GRACE_S to stop.
    assert termination_grace > pre_stop + serve_args.grace_period + app._STOP_GRACE_S


def test_model_is_mounted_read_only_where_the_image_looks(serve_args, container, deployment):
    [mount] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == serve_args.model]
    assert mount["readOnly"]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_headless_service_selects_the_pods_by_named_ports(container, deployment):
    service = yaml.safe_load((SERVICE / "kubernetes" / "service.yaml").read_text())
    budget = yaml.safe_load((SERVICE / "kubernetes" / "pdb.yaml").read_text())
    assert service["spec"]["clusterIP"] == "None"  # DNS lists every ready pod: client-side round_robin
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"]  # headless: clients dial the pod's port


def test_client_service_config_balances_checks_health_and_retries_draining_replicas():
    config = json.loads((SERVICE / "client_service_config.json").read_text())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"]["serviceName"] == app.CHAT_SERVICE
    [method] = config["methodConfig"]
    assert method["name"] == [{"service": app.CHAT_SERVICE}]
    assert "UNAVAILABLE" in method["retryPolicy"]["retryableStatusCodes"]
