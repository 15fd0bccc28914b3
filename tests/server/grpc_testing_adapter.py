"""Lets grpcio-testing's synchronous test server drive the grpc.aio ChatServicer.

grpc_testing calls servicer methods from its own threads with a synchronous ServicerContext; this
runs each aio method on an event loop thread and gives it the async context surface it uses.
An abort becomes the synchronous idiom (set code, details and trailing metadata, then return), which
is the one way grpc_testing reports the trailing metadata (where the BadRequest details travel).
"""

import asyncio

import grpc


class _Aborted(Exception):
    pass


class AioContext:
    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._context.set_trailing_metadata(trailing_metadata)
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def invocation_metadata(self):
        return self._context.invocation_metadata()


class SyncServicer:
    def __init__(self, servicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def Chat(self, request, context):
        try:
            return self._result(self._servicer.Chat(request, AioContext(context)), context)
        except _Aborted:
            return None

    def StreamChat(self, request, context):
        stream = self._servicer.StreamChat(request, AioContext(context))
        try:
            while True:
                try:
                    yield self._result(_next(stream), context)
                except (StopAsyncIteration, _Aborted):
                    return
        finally:
            asyncio.run_coroutine_threadsafe(stream.aclose(), self._loop).result()

    def _result(self, coroutine, context: grpc.ServicerContext):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        # The test cancelled the call (now or before): cancel the coroutine, as grpc.aio does.
        if not context.add_callback(future.cancel):
            future.cancel()
        return future.result()


async def _next(stream):
    return await stream.__anext__()
