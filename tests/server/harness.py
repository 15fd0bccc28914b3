"""A ChatServer on an event loop in a background thread, or a server in its own process, for tests
that call them through real gRPC channels."""

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager

from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.engine.engine import LLMEngine
from mistral_grpc.server.app import ChatServer, ServeOptions


class LoopThread:
    """An event loop running in a daemon thread (one for the whole session: grpc.aio wants one loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine):
        """Schedules the coroutine; returns its concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine, timeout: float = 60):
        return self.submit(coroutine).result(timeout=timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class LiveServer:
    def __init__(self, engine, loop: LoopThread, options: ServeOptions | None = None) -> None:
        self.engine = engine
        self.loop = loop
        self.options = options or ServeOptions(host="localhost", port=0)
        self.server: ChatServer = loop.run(self._create())
        self.starting = None
        self._stopping = None

    @property
    def target(self) -> str:
        return f"localhost:{self.server.port}"

    async def _create(self) -> ChatServer:
        return ChatServer(self.engine, self.options)

    def start(self, wait_for_engine: bool = True) -> "LiveServer":
        self.starting = self.loop.submit(self.server.start())
        if wait_for_engine:
            self.starting.result(timeout=60)
        return self

    def begin_stop(self):
        """Starts draining (returns the future of drain_and_stop); stop() waits for it."""
        if self._stopping is None:
            self._stopping = self.loop.submit(self.server.drain_and_stop())
        return self._stopping

    def stop(self) -> None:
        self.begin_stop().result(timeout=60)


@contextmanager
def demo_server(loop: LoopThread, **engine_args) -> Iterator[LiveServer]:
    """A LiveServer on the real engine with the demo model on the CPU, stopped on exit."""
    server = LiveServer(LLMEngine(EngineArgs(device="cpu", **engine_args)), loop).start()
    try:
        yield server
    finally:
        server.stop()


class ServerProcess:
    """`python ARGS...` serving in a child process; ready once it logs "SERVING model ... on port N"."""

    def __init__(self, args: list[str]) -> None:
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.process = subprocess.Popen([sys.executable, *args], env=self.env, stderr=subprocess.PIPE, text=True)
        self.log: queue.Queue[str] = queue.Queue()
        self.lines: list[str] = []  # every stderr line so far, including those wait_for_log went past
        threading.Thread(target=lambda: [(self.lines.append(line), self.log.put(line)) for line in self.process.stderr],
                         daemon=True).start()
        self.port = int(self.wait_for_log(r"SERVING model .* on port (\d+)").group(1))
        self.target = f"localhost:{self.port}"

    def wait_for_log(self, pattern: str, timeout: float = 120) -> re.Match:
        while True:
            line = self.log.get(timeout=timeout)
            if match := re.search(pattern, line):
                return match

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
