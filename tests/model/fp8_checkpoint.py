"""Write a ModelOpt-style FP8 checkpoint of a model, the way NVIDIA's FP8 release is made (model spec
§3.3): the quantizable projections (Mamba, MLP, routed and shared experts) in e4m3 with one weight
scale per tensor (per expert), static input scales calibrated on sample tokens (amax / 448 of each
projection's input; per expert for the routed experts), k/v scales of the attention layers; the
rest (attention, conv, norms, router, embeddings, lm_head, and the layers in `dense_layers`) as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from model_helpers import logits_of
from safetensors.torch import load_file, save_file

from hybridserve.model.linear import FP8_PER_TENSOR, MIN_SCALE, WEIGHT_MODULES, Experts, Linear
from hybridserve.model.loader import save_checkpoint
from hybridserve.model.nemotron_h import Attention, NemotronHForCausalLM
from hybridserve.ops.reference.fp8 import FP8_MAX


def _layer_of(path: str) -> int | None:
    parts = path.split(".")
    return int(parts[2]) if parts[:2] == ["backbone", "layers"] else None


@torch.no_grad()
def calibrate(model: NemotronHForCausalLM, fp8_modules: set[str], sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """amax of every fp8 projection's input (key: module path; routed experts: `path.{j}.{proj}`) and of
    each attention layer's keys / values (`path.k`, `path.v`), over the sequences run one by one."""
    amax: dict[str, torch.Tensor] = {}

    def record(key: str, value: torch.Tensor) -> None:
        a = value.detach().float().abs().amax() if value.numel() else torch.zeros(())
        amax[key] = torch.maximum(amax.get(key, a), a)

    def linear_hook(path):
        return lambda module, args: record(path, args[0])

    def experts_hook(path):
        def hook(module: Experts, args):
            x, _, ids = args[:3]
            for j in range(module.num_experts):
                rows = (ids == j).any(-1)
                h = torch.relu(x[rows] @ module.up_proj[j].t()).square()
                record(f"{path}.{j}.up_proj", x[rows])
                record(f"{path}.{j}.down_proj", h)
        return hook

    def kv_hook(key):
        return lambda module, args, out: record(key, out)

    handles = []
    for path, m in model.named_modules():
        if path in fp8_modules:
            hook = experts_hook(path) if isinstance(m, Experts) else linear_hook(path)
            handles.append(m.register_forward_pre_hook(hook))
        if isinstance(m, Attention):
            handles.append(m.k_proj.register_forward_hook(kv_hook(f"{path}.k")))
            handles.append(m.v_proj.register_forward_hook(kv_hook(f"{path}.v")))
    try:
        for ids in sequences:
            logits_of(model, ids)
    finally:
        for h in handles:
            h.remove()
    return amax


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax / FP8_MAX).clamp_min(MIN_SCALE).reshape(())


@torch.no_grad()
def modelopt_fp8(model: NemotronHForCausalLM, fp8_modules: set[str], amax: dict[str, torch.Tensor]) -> NemotronHForCausalLM:
    """The FP8 twin of a dense `model` (see the module docstring) with the calibrated `amax`; the
    routed experts keep the maximum of their input scales (as served)."""
    out = NemotronHForCausalLM(model.config, model.dtype, "cpu", dict.fromkeys(fp8_modules, FP8_PER_TENSOR))
    dense = dict(model.named_modules())
    owned = {f"{path}.{n}" for path in fp8_modules for n, _ in dense[path].named_parameters()}
    out.load_state_dict({k: v for k, v in model.state_dict().items() if k not in owned}, strict=False)
    for path, m in out.named_modules():
        if path not in fp8_modules:
            if isinstance(m, Attention):
                m.load("k_proj.k_scale", _scale(amax[f"{path}.k"]))
                m.load("v_proj.v_scale", _scale(amax[f"{path}.v"]))
            continue
        if isinstance(m, Linear):
            m.load("weight", dense[path].weight)
            m.load("input_scale", _scale(amax[path]))
        else:
            for proj in m.PROJS:
                m.load(proj, getattr(dense[path], proj))
                for j in range(m.num_experts):
                    m.load(f"{proj}.input_scale", _scale(amax[f"{path}.{j}.{proj}"]), j)
    return out.eval()


def write_modelopt_checkpoint(model: NemotronHForCausalLM, directory: Path, sequences: list[list[int]],
                              dense_layers: tuple[int, ...] = (), tokenizer=None) -> Path:
    """save_checkpoint of the FP8 twin, with each routed expert's own input scales on disk (as ModelOpt
    writes them; the loader takes their maximum)."""
    fp8_modules = {path for path, m in model.named_modules()
                   if isinstance(m, WEIGHT_MODULES) and m.quantizable and _layer_of(path) not in dense_layers}
    amax = calibrate(model, fp8_modules, sequences)
    save_checkpoint(modelopt_fp8(model, fp8_modules, amax), directory, tokenizer=tokenizer)
    file = directory / "model.safetensors"
    tensors = load_file(file)
    for key, value in amax.items():
        if ".experts." in key:  # path.{j}.{proj}
            tensors[f"{key}.input_scale"] = _scale(value)
    save_file(tensors, file, metadata={"format": "pt"})
    return directory
