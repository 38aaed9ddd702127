"""Train the tiny preset to answer one fixed chat with a reasoning block and a tool call.

The sequence is the template-rendered prompt (with a tool) + the target completion. To stay within
seconds on a CPU, only the position-wise top of the model is trained: the last layer (an MoE
layer: it mixes nothing across positions), the final norm and `lm_head`. The lower layers are left
as they are, so their activations for the sequence are computed once and every Adam step is a
cheap pass over the completion positions. Training stops when teacher-forced argmax reproduces the
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
MARGIN = 4.0  # target logit above every other logit, at every completion position


def _batch(model, ids: list[int]) -> tuple[ForwardBatch, HybridCache]:
    blocks = len(ids) // BLOCK + 1
    cache = HybridCache.allocate(model.config, 1, blocks, BLOCK, model.dtype)
    return ForwardBatch.build([ids], [0], [0], [list(range(blocks))], BLOCK, logits="all"), cache


@torch.no_grad()
def _below_top(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of the second-to-last layer, residual stream before it) for every position."""
    batch, cache = _batch(model, ids)
    eps = model.config.layer_norm_epsilon
    h, residual = model.backbone.embeddings(batch.input_ids), None
    for layer in model.backbone.layers[:-1]:
        x, residual = model.ops.rms_norm(h, layer.norm.weight, eps, residual)
        h = layer.mixer(x, batch, cache, model.ops)
    return h, residual


def _top(model, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    eps = model.config.layer_norm_epsilon
    top = model.backbone.layers[-1]
    x, residual = model.ops.rms_norm(h, top.norm.weight, eps, residual)
    h = top.mixer(x, None, None, model.ops)
    h, _ = model.ops.rms_norm(h, model.backbone.norm_f.weight, eps, residual)
    return model.lm_head(h).float()


def train_tool_model(out_dir: Path, max_steps: int = 800) -> Path:
    tok = load_tokenizer("tiny")
    prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = prompt_ids + tok.encode(COMPLETION, add_special_tokens=False)
    model = load_model(ModelConfig.from_hf("tiny"), dtype=torch.float32, seed=0)
    assert model.config.layer_types[-1] in "E-", "the top layer must be position-wise"
    first = len(prompt_ids) - 1  # position whose next token is the first completion token
    h, residual = _below_top(model, ids[:-1])
    h, residual = h[first:], residual[first:]
    labels = torch.tensor(ids[first + 1:])
    trained = [*model.backbone.layers[-1].parameters(), model.backbone.norm_f.weight, model.lm_head.weight]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=1e-2)
    for _ in range(max_steps):
        logits = _top(model, h, residual)
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
