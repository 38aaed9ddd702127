"""EngineClient with the engine core in its own process (and in a thread): serve, stream, abort,
stop strings, engine death, clean shutdown with no orphan process, and exit when the API process dies."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

from hybridserve.config import EngineConfig
from hybridserve.engine.client import EngineClient, EngineDeadError
from hybridserve.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def engine_config() -> EngineConfig:
    return EngineConfig(model="tiny", device="cpu", max_model_len=256, max_num_seqs=8, cpu_cache_bytes=16 << 20)


def engine_children() -> list[psutil.Process]:
    """Live child processes, minus multiprocessing's resource tracker (it lives as long as we do)."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


async def collect(client, prompt, params, rid):
    outs = []
    async for out in client.generate(prompt, params, rid):
        outs.append(out)
    return outs


async def wait_for(predicate, timeout=20.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned engine inherits it (see conftest)


async def test_engine_process_serves_aborts_and_shuts_down_cleanly():
    before = {p.pid for p in engine_children()}
    client = await EngineClient.create(engine_config())
    try:
        engine_pid = client._worker.pid
        assert engine_pid in {p.pid for p in engine_children()} and client.is_ready and not client.errored
        assert client.max_model_len == 256 and client.stats().num_blocks > 0
        prompt = client.tokenizer.encode("Hello world", add_special_tokens=False)

        # two concurrent streams; the text arrives one step at a time and adds up
        a, b = await asyncio.gather(
            collect(client, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "a"),
            collect(client, prompt, SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True), "b"),
        )
        assert len(a) == 8 and a[-1].finished and not any(o.finished for o in a[:-1])
        assert all(len(o.outputs[0].token_ids_delta) == 1 for o in a)
        final = a[-1].outputs[0]
        assert "".join(o.outputs[0].text_delta for o in a) == final.text and final.finish_reason == "length"
        assert [c.token_ids for c in b[-1].outputs] == [final.token_ids] * 2

        # explicit abort mid-stream: the stream ends with finish_reason "abort"
        seen = []
        async for out in client.generate(prompt, LONG, "long"):
            seen.append(out)
            if len(seen) == 3:
                await client.abort("long")
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
        assert len(seen[-1].outputs[0].token_ids) < 200

        # closing the stream early aborts too; the engine frees everything
        stream = client.generate(prompt, LONG, "closed")
        await stream.__anext__()
        await stream.aclose()
        await wait_for(lambda: client.stats().num_running == 0 and client.stats().num_waiting == 0)
        stats = client.stats()
        assert stats.num_free_blocks == stats.num_blocks and stats.num_free_slots == stats.num_slots
        assert stats.generation_tokens_total >= 8 + 16

        # a stop string ends the request on the API side and aborts it in the engine
        text = final.text
        stop = text[3:5]
        outs = await collect(client, prompt, SamplingParams(temperature=0, max_tokens=8, stop=[stop], ignore_eos=True), "s")
        assert outs[-1].outputs[0].text == text[: text.index(stop)] and outs[-1].outputs[0].stop_reason == stop

        # what can never fit fails before the first output
        with pytest.raises(ValueError, match="maximum context length"):
            await collect(client, prompt, SamplingParams(max_tokens=300), "big")
    finally:
        await client.shutdown()
    assert not psutil.pid_exists(engine_pid) or psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE
    assert {p.pid for p in engine_children()} <= before  # no orphan, no leftover child
    assert not client.is_ready


async def test_engine_death_ends_streams_with_an_error():
    client = await EngineClient.create(engine_config())
    try:
        engine_pid = client._worker.pid
        prompt = [57, 86, 343]
        stream = client.generate(prompt, LONG, "x")
        await stream.__anext__()
        os.kill(engine_pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert client.errored and not client.is_ready
        with pytest.raises(EngineDeadError):
            await collect(client, prompt, LONG, "y")
    finally:
        await client.shutdown()
    assert not psutil.pid_exists(engine_pid) or psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE


async def test_in_process_engine_thread():
    client = await EngineClient.create(engine_config(), in_process=True)
    try:
        outs = await collect(client, [57, 86, 343], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "t")
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
    finally:
        await client.shutdown()
    assert not client._worker.is_alive()


def test_engine_exits_when_the_api_process_dies(tmp_path):
    """SIGKILL the API process: its engine core notices the lost parent and exits (no orphan)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "api.py"
    script.write_text(
        "import asyncio, os\n"
        "from hybridserve.config import EngineConfig\n"
        "from hybridserve.engine.client import EngineClient\n"
        "async def main():\n"
        "    c = await EngineClient.create(EngineConfig(model='tiny', device='cpu', max_model_len=256,"
        " max_num_seqs=4, cpu_cache_bytes=8 << 20))\n"
        "    print(c._worker.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    api = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        engine_pid = int(api.stdout.readline())
        engine = psutil.Process(engine_pid)
        assert engine.ppid() == api.pid
        api.kill()
        api.wait(10)
        deadline = time.monotonic() + 20
        while engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the engine core outlived its API process"
            time.sleep(0.1)
    finally:
        if api.poll() is None:
            api.kill()
