"""A ChatServer on its own event loop in a background thread, called through real gRPC channels."""

import asyncio
import threading
from collections.abc import Coroutine

from mistral_grpc.server.app import ChatServer, ServeOptions


class LiveServer:
    def __init__(self, engine, options: ServeOptions | None = None) -> None:
        self.engine = engine
        self.options = options or ServeOptions(host="127.0.0.1", port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ChatServer | None = None
        self._stopped = False

    @property
    def target(self) -> str:
        return f"localhost:{self.server.port}"

    def start(self, wait_for_engine: bool = True) -> None:
        self._thread.start()
        self.server = self.run(self._create())
        starting = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        if wait_for_engine:
            starting.result(timeout=60)

    async def _create(self) -> ChatServer:
        return ChatServer(self.engine, self.options)

    def run(self, coroutine: Coroutine, timeout: float = 60):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.run(self.server.drain_and_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
