"""FP8 served end to end on CPU (reference ops, the module and loader path the GPU runs): a briefly
trained tiny model and its ModelOpt FP8 checkpoint (e4m3 weights, static input scales, k/v scales)
through the engine and the HTTP server, `quantization="fp8"` and `kv_cache_dtype="fp8"` on the tiny
preset, and the flags as the CLI parses them."""

from __future__ import annotations

import argparse
import json

import openai
import pytest
import torch
from fp8_checkpoint import write_modelopt_checkpoint
from model_helpers import logits_of

from hybridserve import LLM, SamplingParams
from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.config_flags import add_config_flags, config_from_args
from hybridserve.model.cache import HybridCache
from hybridserve.model.linear import FP8_DTYPE, FP8_ONLINE, FP8_PER_TENSOR
from hybridserve.model.loader import load_model
from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from hybridserve.tokenizer import load_tokenizer
from tests.serve.helpers import ServerThread
from tests.serve.tiny_tool_model import COMPLETION, MESSAGES, TOOLS, train_tool_model


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return train_tool_model(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def tool_ids(dense_dir):
    """(prompt ids, completion ids) of the chat the model was trained on."""
    tok = load_tokenizer(str(dense_dir))
    prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    return tok.encode(prompt, add_special_tokens=False), tok.encode(COMPLETION, add_special_tokens=False)


@pytest.fixture(scope="module")
def fp8_dir(dense_dir, tool_ids, tmp_path_factory):
    """The ModelOpt FP8 checkpoint of the trained model, calibrated on its chat."""
    dense = load_model(ModelConfig.from_hf(dense_dir))
    prompt, completion = tool_ids
    return write_modelopt_checkpoint(dense, tmp_path_factory.mktemp("fp8") / "ckpt", [prompt + completion],
                                     tokenizer=load_tokenizer(str(dense_dir)))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fp8_greedy_reproduces_dense_where_the_margin_exceeds_the_fp8_error(dense_dir, fp8_dir, tool_ids,
                                                                            kv_cache_dtype):
    """Teacher-forced over the trained completion, the FP8 logits move by at most `err` per position;
    wherever the dense top-2 margin exceeds 2 * err the argmax cannot change, so the engine's greedy
    output from the FP8 checkpoint equals the dense one there: here every completion position."""
    prompt, completion = tool_ids
    ids = prompt + completion
    dense = load_model(ModelConfig.from_hf(dense_dir))
    fp8 = load_model(ModelConfig.from_hf(fp8_dir))
    assert any(f == FP8_PER_TENSOR for f in fp8.weight_formats().values())
    kv_dtype = FP8_DTYPE if kv_cache_dtype == "fp8" else None
    ref, got = logits_of(dense, ids).float(), logits_of(fp8, ids, kv_dtype=kv_dtype).float()
    rows = slice(len(prompt) - 1, len(ids) - 1)  # positions predicting the completion
    err = (got - ref).abs().amax(-1)[rows]
    top2 = ref[rows].topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    assert 0 < err.max() and bool((margin > 2 * err).all()), (err.max().item(), margin.min().item())
    assert torch.equal(got[rows].argmax(-1), ref[rows].argmax(-1))

    outs = []
    greedy = SamplingParams(temperature=0, max_tokens=len(completion) + 8)  # room past the end of turn
    for path, extra in ((dense_dir, {}), (fp8_dir, {"kv_cache_dtype": kv_cache_dtype})):
        llm = LLM(str(path), device="cpu", max_model_len=1024, **extra)
        outs.append(llm.generate([prompt], greedy)[0].outputs[0].token_ids)
    assert outs[0] == outs[1] == completion[: len(outs[0])] and len(outs[0]) == len(completion)


@pytest.mark.parametrize("checkpoint,quantization", [("fp8_dir", None), ("dense_dir", "fp8")])
def test_fp8_behind_the_http_server(request, checkpoint, quantization):
    """The ModelOpt FP8 checkpoint, and the dense one quantized at load, with an FP8 KV cache behind
    the real server: the trained tool call comes back parsed."""
    path = request.getfixturevalue(checkpoint)

    async def engine():
        from hybridserve.engine.client import EngineClient

        return await EngineClient.create(EngineConfig(model=str(path), device="cpu", max_num_seqs=4,
                                                      kv_cache_dtype="fp8", quantization=quantization),
                                         in_process=True)

    app = build_app(ServeSettings(["tool-fp8"]), engine_factory=engine)
    with ServerThread(app) as server:
        server.wait_healthy(120)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tool-fp8", messages=MESSAGES, tools=TOOLS, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_online_fp8_and_fp8_kv_on_the_tiny_preset():
    """--quantization fp8 --kv-cache-dtype fp8: fp8 projections, float8 KV pages that hold
    itemsize times more tokens per byte, and the engine generates (a prompt longer than a page,
    so decode reads pages written by prefill)."""
    dense = LLM("tiny", device="cpu", max_model_len=256)
    fp8 = LLM("tiny", device="cpu", max_model_len=256, quantization="fp8", kv_cache_dtype="fp8")
    runner = fp8.engine.runner
    assert runner.cache.kv.dtype == FP8_DTYPE and dense.engine.runner.cache.kv.dtype == torch.float32
    quantizable = {n for n, m in runner.model.named_modules() if getattr(m, "quantizable", False)}
    assert {n for n, f in runner.model.weight_formats().items() if f == FP8_ONLINE} == quantizable
    cfg, bs = runner.model_config, runner.block_size
    assert HybridCache.bytes_per_block(cfg, bs, torch.float32) == 4 * HybridCache.bytes_per_block(cfg, bs, FP8_DTYPE)
    assert runner.layout.kv_dtype == "float8_e4m3fn" and runner.layout.num_blocks > dense.engine.runner.layout.num_blocks
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (out,) = fp8.generate([prompt], params)
    assert len(out.outputs[0].token_ids) == 12
    # the same math as a model run in one step over the generated sequence (no stale or misplaced pages)
    seq = prompt + out.outputs[0].token_ids
    again = logits_of(runner.model, seq[:-1], block_size=bs, kv_dtype=FP8_DTYPE)
    assert again[len(prompt) - 1:].argmax(-1).tolist() == out.outputs[0].token_ids


def test_quantization_and_kv_cache_dtype_flags():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(parser, EngineConfig)
    for kv in ("fp8", "fp8_e4m3", "auto"):
        config = config_from_args(EngineConfig, parser.parse_args(["--quantization", "fp8", "--kv-cache-dtype", kv]))
        assert (config.quantization, config.kv_cache_dtype) == ("fp8", kv)
    assert config_from_args(EngineConfig, parser.parse_args([])).quantization is None
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'awq'"):
        parser.parse_args(["--quantization", "awq"])
    with pytest.raises(ValueError, match="quantization 'awq' is not supported"):
        EngineConfig(quantization="awq")
