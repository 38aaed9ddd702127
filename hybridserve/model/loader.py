"""Model weights in and out: Hugging Face safetensors checkpoints, dummy weights, FP8 (ModelOpt).

`load_model` is what the engine calls. It allocates the model once, on its device, and copies the
checkpoint into it tensor by tensor (the real model is 63 GB: no second copy ever exists). Every
parameter must be filled exactly by the files, or loading stops with a `CheckpointError` naming the
tensor — nothing half-loads silently.

On-disk names are the HF ones (`backbone.layers.{i}.mixer...`, `backbone.norm_f`, `lm_head`;
transformers' in-memory `model.` prefix is accepted too). Routed experts are stored one tensor per
expert (`experts.{j}.up_proj.weight`) and stacked here into `experts.up_proj [E, I, hidden]`;
already-stacked `experts.up_proj` is accepted. `mtp.*` tensors are ignored.

FP8: a linear is FP8 iff its `.weight` is float8_e4m3 with a scalar `.weight_scale` next to it
(ModelOpt per-tensor format, decided per tensor from the file). Without an FP8 GEMM it is
dequantized at load: W = float(W_fp8) * weight_scale, cast to the model dtype; `input_scale` is
read past (it only matters to an FP8 GEMM).

`save_checkpoint` writes the same format (tests, trained tiny models).
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from hybridserve.config import LOAD_FORMATS, ModelConfig
from hybridserve.model.nemotron_h import NemotronHForCausalLM

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"BF16", "F16", "F32"}
SCALE_SUFFIXES = (".weight_scale", ".input_scale")
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")  # FP8 KV-cache scales: no FP8 KV cache yet
_EXPERT = re.compile(r"^(?P<stack>.*\.experts)\.(?P<j>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
_MTP = re.compile(r"^((backbone|model)\.)?mtp\.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor and the problem."""


def load_model(
    config: ModelConfig,
    load_format: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> NemotronHForCausalLM:
    """The model with its weights: from `config.path`'s safetensors files, or random ("dummy", and
    presets, which have no files). dtype defaults to the config's torch_dtype. On the meta device
    dummy weights stay unallocated (shapes only)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, not {load_format!r}")
    dtype = dtype or getattr(torch, config.torch_dtype)
    if load_format == "auto" and not config.has_weights and config.preset is None:
        raise CheckpointError(f"{config.path}: no *.safetensors files (use load_format='dummy' for random weights)")
    check_weights_fit(config, dtype, device)
    model = NemotronHForCausalLM(config, dtype, device)
    if load_format == "dummy-uniform":
        model.init_uniform(seed)
    elif load_format == "dummy" or not config.has_weights:
        if torch.device(device).type != "meta":
            model.init_random(seed)
    else:
        load_checkpoint(model, config.path)
    return model.eval()


def check_weights_fit(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse, before anything is allocated, weights larger than the GPU's free memory (the
    full-size model needs ~59 GiB in bf16): a clear error instead of an out-of-memory mid-load."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    shapes = NemotronHForCausalLM(config, dtype, "meta")  # the real module tree, no memory
    need = sum(t.numel() * t.element_size() for t in [*shapes.parameters(), *shapes.buffers()])
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise MemoryError(f"the model's weights need {need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB "
                          f"free of {total / 2**30:.1f} GiB: free the GPU, or use a card with more memory")


@torch.no_grad()
def load_checkpoint(model: NemotronHForCausalLM, directory: str | Path) -> None:
    """Fill every parameter of `model` from the safetensors files in `directory`, or raise."""
    directory = Path(directory)
    _check_quantization(directory)
    params = dict(model.named_parameters())
    loaded: dict[str, set[int] | None] = {}  # param -> expert rows loaded (None: the whole tensor)
    with _Files(_tensor_files(directory)) as files:
        for name in tqdm(files.names, desc="loading weights", unit="tensor", mininterval=1.0):
            if _MTP.match(name) or name.endswith(KV_SCALE_SUFFIXES):
                continue
            if name.endswith(".weight_scale_2"):
                raise CheckpointError(f"{name}: unsupported quantization (NVFP4 two-level scales)")
            if name.endswith(SCALE_SUFFIXES):
                weight = name.rsplit(".", 1)[0] + ".weight"
                if weight not in files.names or files.dtype(weight) != "F8_E4M3":
                    raise CheckpointError(f"{name}: unexpected tensor (a scale without a float8_e4m3 {weight})")
                continue
            target, expert = _param_name(name)
            param = params.get(target)
            if param is None or (expert is not None and expert >= param.shape[0]):
                raise CheckpointError(f"{name}: unexpected tensor (the model has no such parameter)")
            if target in loaded and (expert is None or loaded[target] is None or expert in loaded[target]):
                raise CheckpointError(f"{name}: {target} is given twice in the checkpoint")
            dst = param if expert is None else param[expert]
            if files.shape(name) != list(dst.shape):
                raise CheckpointError(f"{name}: shape {files.shape(name)}, the model expects {list(dst.shape)}")
            dst.copy_(_read_weight(files, name, dst.device))
            if expert is None:
                loaded[target] = None
            else:
                loaded.setdefault(target, set()).add(expert)
    _fill_tied_lm_head(model, params, loaded)
    _check_complete(params, loaded)


def _read_weight(files: _Files, name: str, device: torch.device) -> torch.Tensor:
    """One tensor on `device`, dequantized if it is a ModelOpt FP8 weight."""
    dtype = files.dtype(name)
    if dtype in FLOAT_DTYPES:
        return files.tensor(name).to(device)
    if dtype != "F8_E4M3":
        raise CheckpointError(f"{name}: unsupported dtype {dtype} (expected BF16, F16, F32 or F8_E4M3)")
    scale_name = name[: -len("weight")] + "weight_scale"
    if not name.endswith(".weight") or scale_name not in files.names:
        raise CheckpointError(f"{name}: float8_e4m3 tensor without a {scale_name} (unsupported quantization)")
    scale = files.tensor(scale_name)
    if scale.numel() != 1 or files.dtype(scale_name) not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{scale_name}: unsupported quantization ({files.dtype(scale_name)} {list(scale.shape)}; "
            "only per-tensor float scales are supported)"
        )
    return files.tensor(name).to(device).float() * scale.to(device).float()


class _Files:
    """Open safetensors files, by tensor name; each file is opened once, on first use."""

    def __init__(self, where: dict[str, Path]):
        self.where, self.names = where, where.keys()
        self._stack, self._open = ExitStack(), {}

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, name: str):
        path = self.where[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def dtype(self, name: str) -> str:
        return self._file(name).get_slice(name).get_dtype()

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)


def _param_name(name: str) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (model parameter name, expert row or None)."""
    if name.startswith("model."):
        name = "backbone." + name[len("model.") :]
    m = _EXPERT.match(name)
    if m:
        return f"{m['stack']}.{m['proj']}", int(m["j"])
    return name, None


def _fill_tied_lm_head(model, params, loaded) -> None:
    """Configs with tie_word_embeddings may omit lm_head.weight: it is the embedding table."""
    if model.config.tie_word_embeddings and "lm_head.weight" not in loaded and "backbone.embeddings.weight" in loaded:
        params["lm_head.weight"].copy_(params["backbone.embeddings.weight"])
        loaded["lm_head.weight"] = None


_STACKED = ("experts.up_proj", "experts.down_proj")  # our parameters holding all routed experts


def _expert_name(stacked: str, j: int) -> str:
    """Checkpoint name of expert j's slice of a stacked parameter: ...experts.up_proj -> ...experts.j.up_proj.weight."""
    stack, proj = stacked.rsplit(".", 1)
    return f"{stack}.{j}.{proj}.weight"


def _check_complete(params, loaded) -> None:
    """Raise naming the first missing tensors (checkpoint names) if any parameter was not filled."""
    missing = []
    for name, p in params.items():
        rows = loaded.get(name, set())
        if rows is None:
            continue
        if name.endswith(_STACKED):
            missing += [_expert_name(name, j) for j in range(p.shape[0]) if j not in rows]
        else:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Every tensor name -> the file holding it (from the shard index, else from each file's header)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        where = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(where.values())):
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {file.name} does not exist")
        return where
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"{name}: in both {where[name].name} and {file.name}")
                where[name] = file
    return where


def _check_quantization(directory: Path) -> None:
    """Refuse quantization schemes other than ModelOpt FP8 (the tensors decide the rest)."""
    algo = None
    hf_quant = directory / "hf_quant_config.json"
    if hf_quant.is_file():
        algo = json.loads(hf_quant.read_text()).get("quantization", {}).get("quant_algo")
    elif (directory / "config.json").is_file():
        qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
        algo = qc.get("quant_algo") or qc.get("quant_method")
        if algo == "modelopt":
            algo = "FP8"
    if algo is not None and str(algo).upper() != "FP8":
        raise CheckpointError(
            f"{directory}: unsupported quantization {algo!r} (supported: none, or ModelOpt per-tensor FP8)"
        )


def save_checkpoint(
    model: NemotronHForCausalLM,
    directory: str | Path,
    tokenizer=None,
    shard_size: int | None = None,
) -> None:
    """Write `model` as a Hugging Face checkpoint: safetensors with per-expert HF names (sharded with
    an index when `shard_size` bytes are exceeded), config.json, and the tokenizer's files if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in _hf_tensors(model):
        nbytes = t.numel() * t.element_size()
        if shard_size is not None and shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        # clone: expert rows are views of one stacked tensor, and safetensors refuses shared storage
        tensors = {name: t.detach().to("cpu").clone().contiguous() for name, t in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config_dict(model.config, model.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _hf_tensors(model: NemotronHForCausalLM):
    """(checkpoint name, tensor) pairs: model parameters with the routed experts unstacked."""
    for name, p in model.named_parameters():
        if name.endswith(_STACKED):
            for j in range(p.shape[0]):
                yield _expert_name(name, j), p[j]
        else:
            yield name, p


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json content for `config`: the source config.json's keys (when there is one), with
    every value we know written over them; quantization dropped (weights are saved unquantized)."""
    raw = {}
    if config.path is not None and (Path(config.path) / "config.json").is_file():
        raw = json.loads((Path(config.path) / "config.json").read_text())
    for key in ("quantization_config", "layers_block_type", "dtype"):
        raw.pop(key, None)
    skip = {"layer_types", "quantization", "path", "preset", "eos_token_id"}
    raw.update({f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip})
    eos = list(config.eos_token_id)
    raw.update(
        architectures=["NemotronHForCausalLM"],
        model_type="nemotron_h",
        hybrid_override_pattern=config.layer_types,
        num_hidden_layers=config.num_layers,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        torch_dtype=str(dtype).replace("torch.", ""),
    )
    return raw
