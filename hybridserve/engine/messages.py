"""The messages between the API side (EngineClient) and the engine-core process, over ZMQ.

msgpack-encoded msgspec structs, tagged so one decoder reads each direction. Client -> engine:
AddRequest, AbortRequest, Shutdown. Engine -> client: EngineReady once (or with `error` when
start-up failed), then one EngineStep per model step that produced outputs.
"""

from __future__ import annotations

import msgspec

from hybridserve.engine.cache_manager import CacheLayout
from hybridserve.engine.outputs import EngineOutput
from hybridserve.engine.stats import EngineStats
from hybridserve.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    indices: list[int] | None = None  # None: every choice


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class EngineReady(msgspec.Struct, tag=True, array_like=True):
    layout: CacheLayout | None = None  # what the caches hold; its check_request is the admission rule
    error: str | None = None


class EngineStep(msgspec.Struct, tag=True, array_like=True):
    outputs: list[EngineOutput]
    stats: EngineStats


EngineInput = AddRequest | AbortRequest | Shutdown
EngineMessage = EngineReady | EngineStep
