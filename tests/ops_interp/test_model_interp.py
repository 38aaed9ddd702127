"""The tiny model with the Triton ops (interpreted) against the reference ops, on the CPU: the steps
of tests/gpu/model_cases.py (prefix-cache state captures inside a chunk included), every layer
sharing the forward's launch metadata (`per_batch`). Skipped on machines with a GPU (tests/gpu runs
the same steps compiled)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/gpu runs these steps compiled", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))

from model_cases import CAPTURES, assert_padding_changes_nothing, run_padded_steps, run_steps  # noqa: E402

from hybridserve.config import ModelConfig  # noqa: E402
from hybridserve.model.nemotron_h import NemotronHForCausalLM  # noqa: E402
from hybridserve.ops import reference  # noqa: E402
from hybridserve.ops import triton as triton_ops  # noqa: E402


def test_tiny_model_triton_matches_reference_with_captures():
    cfg = ModelConfig.from_hf("tiny")
    model = NemotronHForCausalLM(cfg, torch.float32)
    model.init_random(seed=3)
    got, cache_t = run_steps(model, triton_ops, torch.float32, torch.float32, "cpu", decodes=0)
    want, cache_r = run_steps(model, reference, torch.float32, torch.float32, "cpu", decodes=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_t.ssm_state, cache_r.ssm_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_t.conv_state, cache_r.conv_state, rtol=1e-5, atol=1e-5)
    assert all(cache_t.ssm_state[:, row].abs().sum() > 0 for row in CAPTURES[:, 1])  # the snapshot rows were written


def test_padded_steps_match_eager_steps():
    """A step padded as a prefill CUDA graph runs it (empty sequences the kernels skip, a padding
    sequence on the spare slot and block) computes what the eager step computes."""
    model = NemotronHForCausalLM(ModelConfig.from_hf("tiny"), torch.float32)
    model.init_random(seed=3)
    eager, padded, cache_e, cache_p = run_padded_steps(model, triton_ops, torch.float32, "cpu")
    assert_padding_changes_nothing(eager, padded, cache_e, cache_p, tol=1e-5)
