"""EngineClient: the API process's handle on the engine core (contract in docs/contracts.md).

The engine core runs in its own process (spawned) or, with `in_process=True`, in a thread of this
one; either way the two sides talk over ZMQ ipc sockets in a private temp dir with msgpack
messages (`engine/messages.py`). One asyncio task reads every engine message, runs the output
processor and feeds each request's queue, so `generate` is a plain async stream. Aborts (explicit,
a closed stream, or a stop string) travel as messages too. If the engine dies the client turns
`errored` and every open stream raises EngineDeadError.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.cache_manager import CacheLayout
from hybridserve.engine.engine_core import run_engine_core_process
from hybridserve.engine.llm import end_of_turn_token_ids
from hybridserve.engine.messages import (
    AbortRequest,
    AddRequest,
    EngineMessage,
    EngineReady,
    EngineStep,
    Shutdown,
)
from hybridserve.engine.output_processor import OutputProcessor
from hybridserve.engine.outputs import RequestOutput
from hybridserve.engine.stats import EngineStats
from hybridserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0
_LIVENESS_POLL_MS = 500


class EngineDeadError(RuntimeError):
    """The engine core stopped (crashed or shut down); in-flight requests cannot complete."""


class EngineClient:
    model_config: ModelConfig
    tokenizer: object
    layout: CacheLayout  # from the engine once it is ready
    max_model_len: int

    def __init__(self) -> None:  # use `await EngineClient.create(...)`
        self.is_ready = False
        self.errored = False
        self._stats = EngineStats()
        self._queues: dict[str, asyncio.Queue] = {}
        self._worker: multiprocessing.process.BaseProcess | threading.Thread | None = None
        self._reader: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def create(cls, config: EngineConfig, *, in_process: bool = False) -> EngineClient:
        """Load the tokenizer and model config, start the engine core, wait until it is ready."""
        from hybridserve.tokenizer import load_tokenizer

        self = cls()
        self.config = config
        self.model_config = ModelConfig.from_hf(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._tmpdir = tempfile.mkdtemp(prefix="hybridserve-")
        input_address = f"ipc://{self._tmpdir}/input"
        output_address = f"ipc://{self._tmpdir}/output"
        self._ctx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(input_address)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineMessage)
        args = (config, input_address, output_address, end_of_turn_token_ids(self.tokenizer))
        if in_process:
            self._worker = threading.Thread(target=run_engine_core_process, args=args, name="engine-core", daemon=True)
        else:
            spawn = multiprocessing.get_context("spawn")
            self._worker = spawn.Process(target=run_engine_core_process, args=(*args, os.getpid()), name="engine-core", daemon=True)
        self._worker.start()
        try:
            ready = await self._wait_ready()
        except BaseException:
            await self.shutdown()
            raise
        self.layout = ready.layout
        self.max_model_len = self.layout.max_model_len
        self._stats = EngineStats(num_blocks=self.layout.num_blocks, num_slots=self.layout.num_slots,
                                  num_free_blocks=self.layout.num_blocks, num_free_slots=self.layout.num_slots)
        self._reader = asyncio.get_running_loop().create_task(self._read_outputs())
        self.is_ready = True
        return self

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one RequestOutput per engine step that produced tokens; the last is finished.
        Raises ValueError (SamplingParamsError) before yielding if the request is invalid or can
        never fit; EngineDeadError if the engine dies. Closing the stream early aborts the request."""
        if self.errored or self._closed:
            raise EngineDeadError("the engine is not running")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate_vocab(self.model_config.vocab_size)
        self.layout.check_request(len(prompt_token_ids), params.max_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        finished = False
        try:  # from here on, every way out releases the request (a failed send included)
            self._queues[request_id] = queue
            self.output_processor.add_request(request_id, prompt_token_ids, params)
            self._send(AddRequest(request_id, list(prompt_token_ids), params))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None and item.finished:
                    finished = True
                    raise ValueError(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.output_processor.remove(request_id)
                if not self.errored and not self._closed:
                    self._send(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort"."""
        if not self.errored and not self._closed:
            self._send(AbortRequest(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self) -> None:
        """Stop the engine core and wait for it; no process is left behind."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        worker = self._worker
        if worker is not None and worker.is_alive():
            try:
                self._send(Shutdown())
            except zmq.ZMQError:
                pass
            await asyncio.get_running_loop().run_in_executor(None, worker.join, 10.0)
            if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
                worker.terminate()
                worker.join(5.0)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        self._fail_all(EngineDeadError("the engine was shut down"))
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self.is_ready = False

    # ---- internals -----------------------------------------------------------------------------
    def _send(self, msg) -> None:
        self._input.send(self._encoder.encode(msg), flags=zmq.NOBLOCK)

    async def _wait_ready(self) -> EngineReady:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while loop.time() < deadline:
            if await self._output.poll(_LIVENESS_POLL_MS):
                msg = self._decoder.decode(await self._output.recv())
                if isinstance(msg, EngineReady):
                    if msg.error is not None:
                        raise RuntimeError(f"engine core failed to start:\n{msg.error}")
                    return msg
            elif not self._worker.is_alive():
                raise RuntimeError("engine core exited during start-up")
        raise TimeoutError(f"engine core not ready after {STARTUP_TIMEOUT_S:.0f} s")

    async def _read_outputs(self) -> None:
        try:
            while True:
                if not await self._output.poll(_LIVENESS_POLL_MS):
                    if not self._worker.is_alive():
                        raise EngineDeadError("the engine core process died")
                    continue
                msg = self._decoder.decode(await self._output.recv())
                if not isinstance(msg, EngineStep):
                    continue
                self._stats = msg.stats
                for engine_output in msg.outputs:
                    out, stopped = self.output_processor.process(engine_output)
                    if stopped:
                        self._send(AbortRequest(engine_output.request_id, stopped))
                    queue = self._queues.get(engine_output.request_id)
                    if out is not None and queue is not None:
                        queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.error("engine failure: %s", e)
            self.errored = True
            self.is_ready = False
            self._fail_all(e if isinstance(e, EngineDeadError) else EngineDeadError(str(e)))

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)
