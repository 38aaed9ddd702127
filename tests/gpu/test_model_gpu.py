"""The tiny preset through NemotronHForCausalLM with the Triton ops against the same model with the
reference ops, on the GPU: logits of every step and the Mamba/KV caches after a ragged prefill,
a chunked-prefill continuation mixed with decodes (with prefix-cache state captures inside its
chunks), and pure decode steps."""

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from model_cases import assert_padding_changes_nothing, run_padded_steps, run_steps  # noqa: E402

from hybridserve.config import ModelConfig  # noqa: E402
from hybridserve.model.loader import load_model  # noqa: E402
from hybridserve.model.nemotron_h import NemotronHForCausalLM  # noqa: E402
from hybridserve.ops import reference  # noqa: E402
from hybridserve.ops import triton as triton_ops  # noqa: E402


def _run(model, ops, dtype, ssm_dtype, kv_dtype=None):
    return run_steps(model, ops, dtype, ssm_dtype, "cuda", kv_dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,ssm_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_tiny_model_triton_matches_reference(dtype, ssm_dtype):
    cfg = ModelConfig.from_hf("tiny")
    model = NemotronHForCausalLM(cfg, dtype, device="cuda")
    model.init_random(seed=3)
    got, cache_t = _run(model, triton_ops, dtype, ssm_dtype)
    want, cache_r = _run(model, reference, dtype, ssm_dtype)
    if dtype == torch.float32:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache_t.ssm_state, cache_r.ssm_state, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache_t.conv_state, cache_r.conv_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache_t.kv, cache_r.kv, rtol=1e-5, atol=1e-5)
    else:
        # both against the model in float32: the Triton path may not be much further off than the reference
        model32 = NemotronHForCausalLM(cfg, torch.float32, device="cuda")
        model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        gold, cache_g = _run(model32, reference, torch.float32, torch.float32)
        for i, (g, w, o) in enumerate(zip(got, want, gold)):
            eg, ew = _rel(g, o), _rel(w, o)
            assert eg <= 2 * ew + 1e-2, f"step {i}: triton {eg:.3e} vs reference {ew:.3e} (against fp32)"
        eg, ew = _rel(cache_t.ssm_state, cache_g.ssm_state), _rel(cache_r.ssm_state, cache_g.ssm_state)
        assert eg <= 2 * ew + 1e-2, f"ssm state: triton {eg:.3e} vs reference {ew:.3e}"


@pytest.mark.parametrize("quantization", [None, "fp8"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_tiny_model_fp8_triton_matches_reference(quantization, kv_dtype):
    """FP8 projections (online, per-channel weights, per-token activations: fp8_linear and the FP8
    fused MoE) and/or FP8 KV pages: the Triton path computes what the reference path computes
    (the same e4m3 values; only accumulation order and rare activation roundings differ), and both
    stay within FP8 error of the bf16 model."""
    cfg = ModelConfig.from_hf("tiny")
    dense = load_model(cfg, "dummy", dtype=torch.bfloat16, device="cuda", seed=3)
    model = load_model(cfg, "dummy", dtype=torch.bfloat16, device="cuda", seed=3, quantization=quantization)
    got, cache_t = _run(model, triton_ops, torch.bfloat16, torch.float32, kv_dtype)
    want, cache_r = _run(model, reference, torch.bfloat16, torch.float32, kv_dtype)
    base, _ = _run(dense, reference, torch.bfloat16, torch.float32)
    for i, (g, w, b) in enumerate(zip(got, want, base)):
        assert _rel(g, w) < 2e-2, f"step {i}: triton vs reference {_rel(g, w):.3e}"
        assert _rel(w, b) < 6e-2, f"step {i}: fp8 vs bf16 {_rel(w, b):.3e}"
    assert cache_t.kv.dtype == (kv_dtype or torch.bfloat16)
    assert _rel(cache_t.kv.float(), cache_r.kv.float()) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_steps_match_eager_steps(dtype):
    """A step padded as a prefill CUDA graph runs it (empty sequences the kernels skip, a padding
    sequence on the spare slot and block) computes what the eager step computes."""
    model = NemotronHForCausalLM(ModelConfig.from_hf("tiny"), dtype, device="cuda")
    model.init_random(seed=3)
    eager, padded, cache_e, cache_p = run_padded_steps(model, triton_ops, dtype, "cuda")
    assert_padding_changes_nothing(eager, padded, cache_e, cache_p, tol=1e-4 if dtype == torch.float32 else 2e-2)
