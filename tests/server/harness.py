"""An event loop in a background thread, and a ChatServer on it called through real gRPC channels."""

import asyncio
import threading
from collections.abc import Coroutine

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
