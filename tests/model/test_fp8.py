"""FP8 weights: ModelOpt FP8 checkpoints served natively (e4m3 weights kept, per-module formats from
the file, static input scales, KV-cache scales), save/load round trips, online `quantization="fp8"`
of dummy and BF16 models, and the errors for FP8 files we cannot serve. All through the reference
ops (the same module and loader path the GPU runs)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from fp8_checkpoint import write_modelopt_checkpoint
from model_helpers import logits_of, tiny_config
from safetensors.torch import load_file, save_file

from hybridserve.config import ModelConfig
from hybridserve.model import linear
from hybridserve.model.linear import DENSE, FP8_DTYPE, FP8_ONLINE, FP8_PER_TENSOR, WeightFormat
from hybridserve.model.loader import CheckpointError, load_model, save_checkpoint

PATTERN = "ME*EM-*E"
IDS = [5, 17, 3, 88, 41, 41, 0, 62, 9, 30, 71, 12, 2]
CALIBRATION = [[(7 * i + 3 * j) % 96 for j in range(24)] for i in range(4)]
FP8_LOGIT_ERR = 0.03  # relative L2 error of the logits against the bf16 model: measured 0.005-0.014


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def dense():
    """bf16, dummy weights, as a BF16 release would be."""
    return load_model(ModelConfig.from_dict(tiny_config(PATTERN, torch_dtype="bfloat16")), "dummy", seed=11)


@pytest.fixture(scope="module")
def bf16_dir(dense, tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    save_checkpoint(dense, path)
    return path


@pytest.fixture(scope="module")
def fp8_dir(dense, tmp_path_factory):
    """ModelOpt-style FP8 of `dense`; Mamba layer 0 stays bf16 (as the FP8 release may keep the Mamba
    layers next to attention)."""
    return write_modelopt_checkpoint(dense, tmp_path_factory.mktemp("fp8") / "ckpt", CALIBRATION, dense_layers=(0,))


def _edit_tensors(directory, edit):
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


EXPECTED_FP8 = {"backbone.layers.1.mixer.experts", "backbone.layers.1.mixer.shared_experts.up_proj",
                "backbone.layers.1.mixer.shared_experts.down_proj", "backbone.layers.4.mixer.in_proj",
                "backbone.layers.4.mixer.out_proj", "backbone.layers.5.mixer.up_proj", "backbone.layers.5.mixer.down_proj"}


def test_modelopt_checkpoint_is_served_in_fp8(dense, fp8_dir):
    quant = json.loads((fp8_dir / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == "FP8"
    assert "backbone.layers.2.mixer.q_proj" in quant["exclude_modules"] and "lm_head" in quant["exclude_modules"]
    disk = load_file(fp8_dir / "model.safetensors")
    model = load_model(ModelConfig.from_hf(fp8_dir))
    formats = model.weight_formats()
    fp8 = {name for name, f in formats.items() if f.fp8}
    assert fp8 == EXPECTED_FP8 | {n.replace("layers.1.", f"layers.{i}.") for n in EXPECTED_FP8 if "layers.1." in n
                                  for i in (3, 7)}
    assert all(formats[name] == FP8_PER_TENSOR for name in fp8) and formats["lm_head"] == DENSE
    params = dict(model.named_parameters())
    # e4m3 bytes and scales exactly as on disk, nothing dequantized
    up = params["backbone.layers.4.mixer.in_proj.weight"]
    assert up.dtype == FP8_DTYPE and torch.equal(_bytes(up),
                                                 _bytes(disk["backbone.layers.4.mixer.in_proj.weight"]))
    mixer = model.backbone.layers[4].mixer
    assert torch.equal(mixer.in_proj.weight_scale, disk["backbone.layers.4.mixer.in_proj.weight_scale"])
    assert torch.equal(mixer.in_proj.input_scale, disk["backbone.layers.4.mixer.in_proj.input_scale"])
    experts = model.backbone.layers[1].mixer.experts
    for j in range(experts.num_experts):
        w = disk[f"backbone.layers.1.mixer.experts.{j}.down_proj.weight"]
        assert torch.equal(_bytes(experts.down_proj[j]), _bytes(w))
        assert experts.down_proj_weight_scale[j] == disk[f"backbone.layers.1.mixer.experts.{j}.down_proj.weight_scale"]
    for proj in ("up_proj", "down_proj"):  # the static input scale is the maximum over the experts'
        in_scales = torch.stack([disk[f"backbone.layers.1.mixer.experts.{j}.{proj}.input_scale"] for j in range(6)])
        assert getattr(experts, f"{proj}_input_scale") == in_scales.max()
    assert in_scales.min() < in_scales.max()
    attn = model.backbone.layers[2].mixer
    assert attn.kv_scale.tolist() == [disk["backbone.layers.2.mixer.k_proj.k_scale"].item(),
                                      disk["backbone.layers.2.mixer.v_proj.v_scale"].item()]
    assert attn.kv_scale.min() < 1  # calibrated, not the default
    # layer 0 and attention stay bf16 and identical to the source
    assert torch.equal(params["backbone.layers.0.mixer.in_proj.weight"], dict(dense.named_parameters())[
        "backbone.layers.0.mixer.in_proj.weight"])
    assert 0 < _rel(logits_of(model, IDS), logits_of(dense, IDS)) < FP8_LOGIT_ERR


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_fp8_checkpoint_round_trips(fp8_dir, tmp_path):
    """Saved as loaded: the same tensors, bit for bit, but one input scale for all routed experts."""
    save_checkpoint(load_model(ModelConfig.from_hf(fp8_dir)), tmp_path)
    a, b = load_file(fp8_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        m = re.fullmatch(r"(.*\.experts)\.\d+\.(\w+)\.input_scale", name)
        if m:
            assert b[name] == max(a[f"{m[1]}.{j}.{m[2]}.input_scale"] for j in range(6))
            continue
        assert a[name].dtype == b[name].dtype and torch.equal(_bytes(a[name]), _bytes(b[name])), name


def test_fp8_weight_memory_is_a_byte_per_weight(dense, fp8_dir):
    model = load_model(ModelConfig.from_hf(fp8_dir))
    experts = model.backbone.layers[1].mixer.experts
    assert experts.up_proj.element_size() == 1
    nbytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    dense_bytes = sum(t.nbytes for t in [*dense.parameters(), *dense.buffers()])
    fp8_elems = sum(p.numel() for p in model.parameters() if p.dtype == FP8_DTYPE)
    assert nbytes < dense_bytes - fp8_elems * 0.9  # ~1 byte saved per fp8 weight, scales are small


def test_per_channel_weight_scales_are_served(fp8_dir, tmp_path, dense):
    directory = tmp_path / "ckpt"
    shutil.copytree(fp8_dir, directory)
    name = "backbone.layers.4.mixer.out_proj"
    source = dict(dense.named_parameters())[f"{name}.weight"]

    def per_channel(t):
        t[f"{name}.weight"], t[f"{name}.weight_scale"] = linear.quantize_weight(source, per_channel=True)

    _edit_tensors(directory, per_channel)
    model = load_model(ModelConfig.from_hf(directory))
    out_proj = model.backbone.layers[4].mixer.out_proj
    assert out_proj.format == WeightFormat(fp8=True, per_channel=True, static_input=True)
    assert out_proj.weight_scale.shape == (32,)
    deq = out_proj.weight.float() * out_proj.weight_scale[:, None]
    torch.testing.assert_close(deq, source.float(), rtol=2**-4, atol=float(out_proj.weight_scale.max()) * 2**-9)
    assert _rel(logits_of(model, IDS), logits_of(dense, IDS)) < FP8_LOGIT_ERR


@pytest.mark.parametrize("shape", [(3,), (32, 2)])
def test_fp8_scale_of_another_shape_is_refused(fp8_dir, tmp_path, shape):
    directory = tmp_path / "ckpt"
    shutil.copytree(fp8_dir, directory)
    name = "backbone.layers.4.mixer.out_proj.weight_scale"
    _edit_tensors(directory, lambda t: t.__setitem__(name, torch.full(shape, 0.01)))
    with pytest.raises(CheckpointError, match=f"{name}.*unsupported quantization"):
        load_model(ModelConfig.from_hf(directory))


def test_fp8_tensor_of_a_module_that_cannot_be_fp8_is_refused(fp8_dir, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(fp8_dir, directory)
    name = "backbone.layers.0.mixer.conv1d.weight"
    _edit_tensors(directory, lambda t: t.update({name: t[name].to(FP8_DTYPE),
                                                 name + "_scale": torch.tensor(1.0)}))
    with pytest.raises(CheckpointError, match=f"{name}: float8_e4m3 tensor"):
        load_model(ModelConfig.from_hf(directory))


def test_unsupported_quantization_config_is_refused(fp8_dir, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(fp8_dir, directory)
    quant = json.loads((directory / "hf_quant_config.json").read_text())
    quant["quantization"]["quant_algo"] = "NVFP4"
    (directory / "hf_quant_config.json").write_text(json.dumps(quant))
    with pytest.raises(CheckpointError, match="unsupported quantization 'NVFP4'"):
        load_model(ModelConfig.from_hf(directory))


# ---- online quantization (--quantization fp8) -----------------------------------------------


def _dequantized_close(fp8_model, dense_model) -> int:
    """Every fp8 weight dequantizes to the dense model's within e4m3 rounding; returns how many."""
    dense_params = dict(dense_model.named_parameters())
    checked = 0
    for path, m in fp8_model.named_modules():
        if not getattr(m, "format", DENSE).fp8:
            continue
        for proj, scale in (("weight", "weight_scale"), ("up_proj", "up_proj_weight_scale"),
                            ("down_proj", "down_proj_weight_scale")):
            if not hasattr(m, proj):
                continue
            w, s = getattr(m, proj).float(), getattr(m, scale)
            deq = w * s[..., None]
            want = dense_params[f"{path}.{proj}"].float()
            torch.testing.assert_close(deq, want, rtol=2**-4, atol=float(s.max()) * 2**-9)
            checked += 1
    return checked


def test_online_fp8_of_the_dummy_preset():
    cfg = ModelConfig.from_hf("tiny")
    dense, fp8 = load_model(cfg), load_model(cfg, quantization="fp8")
    formats = fp8.weight_formats()
    assert {n for n, f in formats.items() if f == FP8_ONLINE} == {n for n, m in fp8.named_modules()
                                                                  if getattr(m, "quantizable", False)}
    assert formats["lm_head"] == formats["backbone.layers.2.mixer.q_proj"] == DENSE
    assert _dequantized_close(fp8, dense) == 2 * 2 + 3 * 4 + 2  # 2 Mamba, 3 MoE (routed + shared), 1 MLP
    assert fp8.backbone.layers[1].mixer.experts.up_proj_input_scale is None  # per-token activation scales
    assert 0 < _rel(logits_of(fp8, IDS), logits_of(dense, IDS)) < FP8_LOGIT_ERR


def test_online_fp8_of_a_bf16_checkpoint(dense, bf16_dir):
    fp8 = load_model(ModelConfig.from_hf(bf16_dir), quantization="fp8")
    assert _dequantized_close(fp8, dense) == 18
    w = dense.backbone.layers[4].mixer.in_proj.weight
    q, s = linear.quantize_weight(w, per_channel=True)
    assert torch.equal(_bytes(fp8.backbone.layers[4].mixer.in_proj.weight), _bytes(q))
    assert 0 < _rel(logits_of(fp8, IDS), logits_of(dense, IDS)) < FP8_LOGIT_ERR


def test_per_channel_scales_quantize_the_weights_more_finely(dense):
    """Why --quantization fp8 uses per-channel weight scales: never a coarser grid than one scale per
    tensor, at no cost in the kernels (one scale per output column in the epilogue)."""
    for name, w in dense.named_parameters():
        if not name.endswith(("in_proj.weight", "out_proj.weight", "shared_experts.up_proj.weight")):
            continue
        errs = []
        for per_channel in (False, True):
            q, s = linear.quantize_weight(w, per_channel)
            errs.append(_rel(q.float() * (s[:, None] if per_channel else s), w))
        assert errs[1] <= errs[0], name


def test_quantization_flag_with_a_modelopt_checkpoint_keeps_the_files_formats(fp8_dir, bf16_dir):
    cfg = ModelConfig.from_hf(fp8_dir)
    native = load_model(cfg)
    for quantization in ("fp8", "modelopt"):
        again = load_model(cfg, quantization=quantization)
        assert again.weight_formats() == native.weight_formats()
        torch.testing.assert_close(logits_of(again, IDS), logits_of(native, IDS), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no ModelOpt FP8 weights"):
        load_model(ModelConfig.from_hf(bf16_dir), quantization="modelopt")
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(ModelConfig.from_hf(bf16_dir), quantization="awq")


def test_full_size_fp8_weights_on_the_meta_device():
    """The full model quantized online: the bytes of model spec §5.2 (scenario A, plus the scales)."""
    model = load_model(ModelConfig.from_hf("nemotron-3-nano-30b-a3b"), "dummy", device="meta", quantization="fp8")
    fp8 = sum(p.numel() for p in model.parameters() if p.dtype == FP8_DTYPE)
    other = sum(p.numel() for p in model.parameters() if p.dtype != FP8_DTYPE)
    assert fp8 == 30_724_055_040 and other == 31_577_940_288 - fp8
    nbytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert nbytes / 2**30 < 30.3  # issue 12's target: <= 32 GiB of weights
