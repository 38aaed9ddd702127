"""The tiny model with the Triton ops (interpreted) against the reference ops, on the CPU: a ragged
prefill, then continuing chunks mixed with decodes and a fresh prompt, with prefix-cache state
captures inside the chunks; every layer shares the forward's launch metadata (`per_batch`)."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from hybridserve.config import ModelConfig  # noqa: E402
from hybridserve.model.cache import HybridCache  # noqa: E402
from hybridserve.model.forward_batch import ForwardBatch  # noqa: E402
from hybridserve.model.nemotron_h import NemotronHForCausalLM  # noqa: E402
from hybridserve.model.state_capture import StateCapture  # noqa: E402
from hybridserve.ops import reference  # noqa: E402
from hybridserve.ops import triton as triton_ops  # noqa: E402

TINY = Path(__file__).parents[2] / "hybridserve" / "presets" / "tiny" / "config.json"


def _run(model, ops):
    model.ops = ops
    cache = HybridCache.allocate(model.config, 7, 64, 4, torch.float32, torch.float32)
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    steps = [{0: toks(5), 1: toks(17), 2: toks(1)}, {0: toks(1), 1: toks(9), 2: toks(1), 3: toks(6)}]
    cached, logits = {}, []
    for i, step in enumerate(steps):
        seqs = sorted(step)
        done = np.array([cached.get(s, 0) for s in seqs])
        batch = ForwardBatch.build([step[s] for s in seqs], done.tolist(), seqs,
                                   [list(range(8 * s, 8 * s + 8)) for s in seqs], 4, logits="all")
        if i == 1:  # sequence 1 captured twice inside its chunk, the fresh sequence 3 two tokens in
            batch.capture = StateCapture.build(np.array([[1, 4, 22], [3, 5, 2], [1, 6, 19]]), np.array(seqs), done,
                                               np.array([len(step[s]) for s in seqs]), torch.from_numpy)
        with torch.no_grad():
            logits.append(model(batch, cache))
        for s in seqs:
            cached[s] = cached.get(s, 0) + len(step[s])
    return logits, cache


def test_tiny_model_triton_matches_reference_with_captures():
    cfg = ModelConfig.from_dict({**json.loads(TINY.read_text()), "torch_dtype": "float32"})
    model = NemotronHForCausalLM(cfg, torch.float32)
    model.init_random(seed=3)
    got, cache_t = _run(model, triton_ops)
    want, cache_r = _run(model, reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_t.ssm_state, cache_r.ssm_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_t.conv_state, cache_r.conv_state, rtol=1e-5, atol=1e-5)
    assert all(cache_t.ssm_state[:, row].abs().sum() > 0 for row in (4, 5, 6))  # the snapshot rows were written
