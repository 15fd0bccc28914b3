"""Load on one or more local replicas: N concurrent StreamChat streams, a bounded number of requests and a
time cap; prints requests/s, tokens/s, time to first token and inter-token latency percentiles.

    python service/load.py --target 127.0.0.1:50051 127.0.0.1:50052 --streams 8 --requests 64 --max-tokens 64

Several targets are balanced by the client with the service config in client_service_config.json
(round_robin, client-side health checks, retry on UNAVAILABLE), as production clients should be.
Loopback addresses only: this is for measuring, not for loading someone else's server.

TTFT: from sending the request to the first chunk with text. ITL: the gaps between a stream's chunks with
text after the first (one token each, unless the detokenizer held a partial character or stop string back).
TPOT: per request, (last text - first text) / (completion tokens - 1); the table gives its mean.
"""

import argparse
import asyncio
import ipaddress
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mistral_grpc.proto.mistral.chat.v1 import chat_pb2, chat_pb2_grpc

SERVICE_CONFIG = Path(__file__).with_name("client_service_config.json").read_text()
_MAX_STREAMS = 256
_MAX_DURATION_S = 600.0


@dataclass
class StreamResult:
    code: str  # the gRPC status name
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    tpot: float | None = None


def loopback_target(targets: list[str]) -> str:
    """A gRPC target over all the host:port given ("ipv4:127.0.0.1:1,127.0.0.1:2"); refuses non-loopback ones."""
    addresses = []
    for target in targets:
        host, _, port = target.rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host.strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise SystemExit(f"load.py: {target!r}: give host:port with a loopback IP or localhost") from None
        if not address.is_loopback or not port.isdigit():
            raise SystemExit(f"load.py: {target!r} is not a loopback host:port; this script loads local servers only")
        addresses.append((address, int(port)))
    versions = {address.version for address, _ in addresses}
    if len(versions) > 1:
        raise SystemExit("load.py: give all targets as IPv4 or all as IPv6")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{address}:{port}" for address, port in addresses)
    return "ipv6:" + ",".join(f"[{address}]:{port}" for address, port in addresses)


async def check_health(targets: list[str]) -> None:
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise SystemExit(f"load.py: {target} is not SERVING")


async def one_stream(stub: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.ChatRequest,
                     timeout: float) -> StreamResult:
    started = time.perf_counter()
    text_times: list[float] = []
    result = StreamResult(code="OK")
    try:
        async for chunk in stub.StreamChat(request, timeout=timeout):
            if any(choice.delta.content for choice in chunk.choices):
                text_times.append(time.perf_counter())
            if chunk.HasField("usage"):
                result.completion_tokens = chunk.usage.completion_tokens
    except grpc.aio.AioRpcError as error:
        return StreamResult(code=error.code().name)
    if text_times:
        result.ttft = text_times[0] - started
        result.gaps = [b - a for a, b in zip(text_times, text_times[1:])]
        if result.completion_tokens > 1:
            result.tpot = (text_times[-1] - text_times[0]) / (result.completion_tokens - 1)
    return result


async def run_load(target: str, streams: int, requests: int, request: chat_pb2.ChatRequest,
                   duration: float) -> tuple[list[StreamResult], float]:
    """Each of `streams` workers sends one stream after another until `requests` have been sent or the
    duration is up (streams still running then are cut by their deadline: DEADLINE_EXCEEDED)."""
    results: list[StreamResult] = []
    remaining = requests
    options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        started = time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and (left := deadline - time.perf_counter()) > 0:
                remaining -= 1
                results.append(await one_stream(stub, request, left))

        await asyncio.gather(*(worker() for _ in range(streams)))
        return results, time.perf_counter() - started


def percentiles(values: list[float]) -> str:
    """p50 / p90 / p99 in milliseconds."""
    if not values:
        return "-"
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return " / ".join(f"{cuts[p - 1] * 1e3:.1f}" for p in (50, 90, 99))


def report(targets: list[str], streams: int, max_tokens: int, results: list[StreamResult], wall: float) -> str:
    ok = [r for r in results if r.code == "OK"]
    failed = Counter(r.code for r in results if r.code != "OK")
    tokens = sum(r.completion_tokens for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    rows = [
        ("replicas", str(len(targets))),
        ("concurrent streams", str(streams)),
        ("max_tokens", str(max_tokens)),
        ("requests ok", str(len(ok))),
        ("requests failed", ", ".join(f"{code} {n}" for code, n in failed.items()) or "0"),
        ("wall time s", f"{wall:.2f}"),
        ("requests/s", f"{len(ok) / wall:.2f}"),
        ("output tokens/s", f"{tokens / wall:.1f}"),
        ("TTFT ms p50 / p90 / p99", percentiles([r.ttft for r in ok if r.ttft is not None])),
        ("ITL ms p50 / p90 / p99", percentiles([gap for r in ok for gap in r.gaps])),
        ("TPOT ms mean", f"{statistics.fmean(tpots) * 1e3:.1f}" if tpots else "-"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", nargs="+", default=["127.0.0.1:50051"], help="replicas, loopback host:port")
    parser.add_argument("--streams", type=int, default=8, help=f"concurrent streams, 1..{_MAX_STREAMS}")
    parser.add_argument("--requests", type=int, default=64, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help=f"cap in seconds, at most {_MAX_DURATION_S:.0f}")
    parser.add_argument("--prompt", default="Tell me a long story about a lighthouse keeper and the sea.")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= _MAX_STREAMS or args.requests < 1 or not 0 < args.duration <= _MAX_DURATION_S:
        parser.error(f"need 1 <= --streams <= {_MAX_STREAMS}, --requests >= 1, 0 < --duration <= {_MAX_DURATION_S}")
    target = loopback_target(args.target)
    request = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content=args.prompt)],
                                   max_tokens=args.max_tokens, temperature=args.temperature)
    asyncio.run(check_health(args.target))
    results, wall = asyncio.run(run_load(target, args.streams, args.requests, request, args.duration))
    print(report(args.target, args.streams, args.max_tokens, results, wall))
    return 0 if all(r.code == "OK" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
