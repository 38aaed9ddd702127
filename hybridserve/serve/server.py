"""Run the app under uvicorn with Kubernetes-style shutdown.

SIGTERM (or Ctrl-C) starts a drain instead of closing the listener: `/health` and new requests
answer 503 while in-flight requests finish, for up to `shutdown_timeout` seconds; the rest are
then aborted (their responses end with finish_reason "abort"), uvicorn stops, the lifespan shuts
the engine core down, and the process exits 0. A second signal stops at once: every in-flight
request ends with a 503 error (the error envelope, or an SSE error frame on a begun stream), its
admission is released, and the process exits 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM), as a shell reports a process a signal stopped. A third signal exits without waiting for
those errors to be sent. If the engine dies the server exits with status 1 so an orchestrator
restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

from hybridserve.serve.app import drain, stop_now
from hybridserve.serve.context import ServerContext

logger = logging.getLogger("hybridserve.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServerContext, shutdown_timeout: float):
        super().__init__(config)
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._tasks: list[asyncio.Task[None]] = []  # the drain, then the stop
        self._watch_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch_task = self._loop.create_task(self._watch_engine())
        try:
            await super().serve(sockets)
        finally:
            self._watch_task.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not super().handle_exit: uvicorn would re-raise the signal after shutdown (exit status != 0).
        name = signal.Signals(sig).name
        self._signals += 1
        if self._loop is None or not self.started or self._signals > 2:
            logger.warning("signal %s: exiting now", name)
            self.should_exit = True
            self.force_exit = self._signals > 2
        elif self._signals == 2:
            logger.warning("signal %s: stopping now; in-flight requests get a 503", name)
            self.exit_code = 128 + sig
            self._loop.call_soon_threadsafe(self._start, self._stop)
        else:
            logger.info("signal %s: draining (up to %.0fs)", name, self.shutdown_timeout)
            self._loop.call_soon_threadsafe(self._start, self._drain)

    def _start(self, step: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(asyncio.ensure_future(step()))

    async def _stop(self) -> None:
        try:
            if not await stop_now(self.ctx):
                logger.warning("%d requests did not end in time", self.ctx.tracker.in_flight)
        finally:
            self.should_exit = True

    async def _drain(self) -> None:
        try:
            await drain(self.ctx, self.shutdown_timeout)
        finally:
            self.should_exit = True

    def engine_failed(self, error: BaseException) -> None:
        logger.error("engine failed to start (%s); exiting", error)
        self.exit_code = 1
        self.should_exit = True

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            engine = self.ctx.engine
            if engine is not None and getattr(engine, "errored", False) and not self.should_exit:
                logger.error("the engine died; exiting so the server can be restarted")
                self.exit_code = 1
                self.should_exit = True
