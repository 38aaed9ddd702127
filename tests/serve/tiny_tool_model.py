"""Train the tiny preset to answer one fixed chat with a reasoning block and a tool call.

The sequence is the template-rendered prompt (with a tool) + the target completion. To stay within
seconds on a CPU, only the top is trained: the last attention layer (it can look back at the
context), the position-wise layers above it, the final norm and `lm_head`. The Mamba layers below
are only rescaled (CONTEXT_GAIN), so their activations are computed once and each Adam step is one attention
layer over the sequence plus position-wise layers over the completion positions. Training stops when teacher-forced argmax reproduces the
completion with a safe logit margin (so greedy decoding by the engine reproduces it too). The
result is written with the loader's `save_checkpoint` (weights, config.json, tokenizer + template).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hybridserve.config import ModelConfig
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.loader import load_model, save_checkpoint
from hybridserve.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
REASONING = "The user wants the weather in Paris. I will call get_weather.\n"
COMPLETION = (REASONING + "</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
              "</function>\n</tool_call><|im_end|>")
BLOCK = 16
MARGIN = 2.0  # target logit above every other logit, at every completion position
CONTEXT_GAIN = 10.0  # random init leaves mixer outputs tiny next to the embeddings: scale them up


def _batch(model, ids: list[int]) -> tuple[ForwardBatch, HybridCache]:
    blocks = len(ids) // BLOCK + 1
    cache = HybridCache.allocate(model.config, 1, blocks, BLOCK, model.dtype)
    return ForwardBatch.build([ids], [0], [0], [list(range(blocks))], BLOCK, logits="all"), cache


def _run_layers(model, layers, h, residual, batch, cache):
    eps = model.config.layer_norm_epsilon
    for layer in layers:
        x, residual = model.ops.rms_norm(h, layer.norm.weight, eps, residual)
        h = layer.mixer(x, batch, cache, model.ops)
    return h, residual


def train_tool_model(out_dir: Path, max_steps: int = 600) -> Path:
    tok = load_tokenizer("tiny")
    prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = prompt_ids + tok.encode(COMPLETION, add_special_tokens=False)
    model = load_model(ModelConfig.from_hf("tiny"), dtype=torch.float32, seed=0)
    layers = model.backbone.layers
    split = model.config.layer_types.rindex("*")  # train from the last attention layer up
    with torch.no_grad():  # make the frozen layers' context visible next to the token embeddings
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight")):
                p.mul_(CONTEXT_GAIN)
    assert set(model.config.layer_types[split + 1:]) <= set("E-"), "layers above the split must be position-wise"
    first = len(prompt_ids) - 1  # position whose next token is the first completion token
    labels = torch.tensor(ids[first + 1:])
    batch, cache = _batch(model, ids[:-1])
    with torch.no_grad():
        h0 = model.backbone.embeddings(batch.input_ids)
        h0, r0 = _run_layers(model, layers[:split], h0, None, batch, cache)
    trained = [p for layer in layers[split:] for p in layer.parameters()]
    trained += [model.backbone.norm_f.weight, model.lm_head.weight]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=3e-3)
    eps = model.config.layer_norm_epsilon
    for _ in range(max_steps):
        _, cache = _batch(model, ids[:-1])  # fresh: the attention layer writes its KV in place
        h, r = _run_layers(model, layers[split:split + 1], h0, r0, batch, cache)
        h, r = _run_layers(model, layers[split + 1:], h[first:], r[first:], None, None)
        h, _ = model.ops.rms_norm(h, model.backbone.norm_f.weight, eps, r)
        logits = model.lm_head(h, model.ops).float()
        target = logits.gather(1, labels[:, None])
        others = logits.scatter(1, labels[:, None], float("-inf")).max(-1, keepdim=True).values
        if bool((target - others > MARGIN).all()):
            break
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise RuntimeError("the tiny model did not learn the completion")
    for p in model.parameters():
        p.requires_grad_(False)
    save_checkpoint(model.eval(), out_dir, tokenizer=tok)
    return out_dir
