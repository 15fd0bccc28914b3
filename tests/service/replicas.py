"""Demo-model replicas of `mistral-grpc serve` on 127.0.0.1, each with its metrics port, and a client
channel that balances over them as service/README.md tells clients to."""

import contextlib
import importlib.util
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerProcess

SERVICE = Path(__file__).resolve().parents[2] / "service"


def _import_load_script():
    spec = importlib.util.spec_from_file_location("service_load", SERVICE / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load = _import_load_script()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DemoReplica(ServerProcess):
    # 4 MiB of KV cache: 2048 tokens of the demo model, for a few streams of a few hundred tokens.
    def __init__(self, grace_period: float) -> None:
        self.metrics_port = free_port()
        try:
            super().__init__(["-m", "mistral_grpc.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                              "--device", "cpu", "--kv-cache-memory", "4MiB", "--max-batch-size", "8",
                              "--metrics-port", str(self.metrics_port), "--grace-period", str(grace_period)])
        except BaseException:
            if hasattr(self, "process"):  # started, but never said SERVING
                self.close()
            raise
        self.address = f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on the replica's /metrics (0 when it has not appeared yet)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def ok_calls(self, rpc: str) -> int:
        return int(self.metric("mistral_grpc_requests_total", rpc=rpc, code="OK"))


@contextlib.contextmanager
def demo_replicas(count: int, grace_period: float = 30.0) -> Iterator[list[DemoReplica]]:
    """Starts them side by side; every one that started is killed on the way out, whatever happened."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(DemoReplica, grace_period) for _ in range(count)]
    started = [future.result() for future in futures if future.exception() is None]
    try:
        for future in futures:
            future.result()  # raises the first start that failed
        yield started
    finally:
        for replica in started:
            replica.close()


def balanced_channel(replicas: list[DemoReplica]) -> grpc.Channel:
    """One channel over all the replicas with service/client_service_config.json."""
    target = load.loopback_target([replica.address for replica in replicas])
    return grpc.insecure_channel(target, options=[("grpc.service_config", load.SERVICE_CONFIG)])
