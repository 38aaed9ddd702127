"""Checkpoint loading and saving: transformers-written checkpoints (single file and sharded),
our own round trip, dummy weights, and clear errors for broken checkpoints (FP8: test_fp8.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import hf_model, logits_of, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybridserve.config import ModelConfig
from hybridserve.model.loader import CheckpointError, load_model, save_checkpoint
from hybridserve.tokenizer import load_tokenizer

PATTERN = "ME*EM-*E"
IDS = [5, 17, 3, 88, 41, 41, 0, 62, 9, 30, 71, 12, 2]


@pytest.fixture(scope="module")
def hf():
    return hf_model(tiny_config(PATTERN), torch.float32, seed=7)


@pytest.fixture(scope="module")
def hf_logits(hf):
    with torch.no_grad():
        return hf(torch.tensor([IDS]), use_cache=False).logits[0].float()


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_single")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A bf16 checkpoint of random weights, written by save_checkpoint."""
    path = tmp_path_factory.mktemp("bf16")
    cfg = ModelConfig.from_dict(tiny_config(PATTERN, torch_dtype="bfloat16"))
    save_checkpoint(load_model(cfg, "dummy", seed=11), path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(directory: Path, edit) -> None:
    """Rewrite the single-file checkpoint in `directory` with edit(dict of tensors)."""
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ---- transformers-written checkpoints -------------------------------------------------------


def test_single_file_hf_checkpoint_gives_transformers_logits(hf_dir, hf_logits):
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight" in names  # per-expert names on disk
    assert "lm_head.weight" in names and not any(n.startswith("model.") for n in names)
    model = load_model(ModelConfig.from_hf(hf_dir))
    assert model.dtype == torch.float32 and not model.training
    torch.testing.assert_close(logits_of(model, IDS), hf_logits, atol=2e-5, rtol=1e-5)


def test_sharded_hf_checkpoint_gives_transformers_logits(hf, hf_logits, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    model = load_model(ModelConfig.from_hf(tmp_path))
    torch.testing.assert_close(logits_of(model, IDS), hf_logits, atol=2e-5, rtol=1e-5)


def test_load_in_bf16_keeps_router_and_ssm_params_fp32(hf_dir, hf):
    model = load_model(ModelConfig.from_hf(hf_dir), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    for name in ["layers.1.mixer.gate.weight", "layers.1.mixer.gate.e_score_correction_bias",
                 "layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias"]:
        assert params["backbone." + name].dtype == torch.float32, name
        torch.testing.assert_close(params["backbone." + name], hf.state_dict()["model." + name], atol=0, rtol=0)


# ---- our own checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [None, 30_000])
def test_save_checkpoint_round_trips(hf_dir, hf_logits, tmp_path, shard_size):
    model = load_model(ModelConfig.from_hf(hf_dir))
    save_checkpoint(model, tmp_path, tokenizer=load_tokenizer("tiny"), shard_size=shard_size)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_size is not None)
    again = load_model(ModelConfig.from_hf(tmp_path))
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(logits_of(again, IDS), hf_logits, atol=2e-5, rtol=1e-5)
    tok = load_tokenizer(tmp_path)
    assert tok.convert_tokens_to_ids("<think>") == 12 and tok.chat_template is not None


def test_transformers_loads_our_checkpoint(hf, hf_dir, hf_logits, tmp_path):
    from transformers import NemotronHForCausalLM as HFModel

    save_checkpoint(load_model(ModelConfig.from_hf(hf_dir)), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "backbone.layers.3.mixer.experts.5.down_proj.weight" in f.keys()
    theirs = HFModel.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([IDS]), use_cache=False).logits[0], hf_logits, atol=1e-6, rtol=1e-6)


def test_bf16_checkpoint_keeps_dtypes(bf16_dir):
    with safe_open(str(bf16_dir / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("backbone.layers.0.mixer.in_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("backbone.layers.1.mixer.gate.weight").get_dtype() == "F32"
    assert json.loads((bf16_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(ModelConfig.from_hf(bf16_dir)).dtype == torch.bfloat16


def test_stacked_experts_and_mtp_tensors_are_accepted(hf_dir, tmp_path):
    directory = _copy(hf_dir, tmp_path / "ckpt")

    def stack_and_add_mtp(t):
        for proj in ("up_proj", "down_proj"):
            names = [f"backbone.layers.1.mixer.experts.{j}.{proj}.weight" for j in range(6)]
            t[f"backbone.layers.1.mixer.experts.{proj}"] = torch.stack([t.pop(n) for n in names])
        t["mtp.layers.0.norm.weight"] = torch.ones(32)

    _edit_tensors(directory, stack_and_add_mtp)
    a = load_model(ModelConfig.from_hf(hf_dir))
    b = load_model(ModelConfig.from_hf(directory))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


# ---- dummy weights and presets --------------------------------------------------------------


def test_full_size_preset_on_meta_device_has_the_published_parameter_count():
    model = load_model(ModelConfig.from_hf("nemotron-3-nano-30b-a3b"), load_format="dummy", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 31_577_940_288
    assert model.dtype == torch.bfloat16 and model.device.type == "meta"


def test_tiny_preset_gets_deterministic_random_weights():
    cfg = ModelConfig.from_hf("tiny")
    a, b, c = load_model(cfg), load_model(cfg, "dummy"), load_model(cfg, "dummy", seed=1)
    w = "backbone.layers.1.mixer.experts.up_proj"
    pa, pb, pc = (dict(m.named_parameters())[w] for m in (a, b, c))
    assert a.dtype == torch.float32 and torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert pa.abs().sum() > 0 and torch.isfinite(logits_of(a, IDS)).all()


def _routed_experts(model, hidden: torch.Tensor) -> list[set[int]]:
    """Experts each token picks in the first MoE layer, for normalised hidden states."""
    moe = model.backbone.layers[model.config.layers_of("E")[0]].mixer
    logits = torch.nn.functional.linear(hidden.float(), moe.gate.weight.float())
    _, ids = model.ops.moe_route(logits, moe.gate.e_score_correction_bias, model.config.num_experts_per_tok, 1.0)
    return [set(row) for row in ids.tolist()]


def test_dummy_uniform_routes_every_token_alike_and_dummy_does_not():
    cfg = ModelConfig.from_hf("tiny")
    uniform, spread = load_model(cfg, "dummy-uniform"), load_model(cfg, "dummy")
    assert all(p.abs().max() <= 1e-3 for p in uniform.parameters())
    w = uniform.backbone.layers[0].norm.weight  # the pre-norm scales the router's input
    hidden = torch.randn(64, cfg.hidden_size) * w
    assert len({frozenset(s) for s in _routed_experts(uniform, hidden)}) == 1
    assert len({frozenset(s) for s in _routed_experts(spread, torch.randn(64, cfg.hidden_size))}) > 8
    assert torch.isfinite(logits_of(uniform, IDS)).all()


def test_dummy_format_ignores_checkpoint_files(hf_dir):
    cfg = ModelConfig.from_hf(hf_dir)
    dummy, loaded = load_model(cfg, "dummy", seed=0), load_model(cfg)
    assert not torch.equal(dummy.lm_head.weight, loaded.lm_head.weight)
    assert torch.isfinite(logits_of(dummy, IDS)).all()


# ---- broken checkpoints ---------------------------------------------------------------------


def _drop(name):
    return lambda t: t.pop(name)


def _reshape(name):
    return lambda t: t.__setitem__(name, t[name][:-1])


def _retype(name, dtype):
    return lambda t: t.__setitem__(name, t[name].to(dtype))


def _add(name):
    return lambda t: t.__setitem__(name, torch.zeros(4))


def _fp8_without_scale(name):
    return lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn))


BROKEN = [
    ("missing tensor", _drop("backbone.layers.2.mixer.k_proj.weight"), "backbone.layers.2.mixer.k_proj.weight"),
    ("missing expert", _drop("backbone.layers.3.mixer.experts.4.down_proj.weight"),
     "backbone.layers.3.mixer.experts.4.down_proj.weight"),
    ("wrong shape", _reshape("backbone.layers.0.mixer.conv1d.weight"), "backbone.layers.0.mixer.conv1d.weight"),
    ("wrong expert shape", _reshape("backbone.layers.1.mixer.experts.2.up_proj.weight"),
     "backbone.layers.1.mixer.experts.2.up_proj.weight"),
    ("integer dtype", _retype("backbone.layers.4.mixer.out_proj.weight", torch.int32),
     "backbone.layers.4.mixer.out_proj.weight"),
    ("fp8 without scale", _fp8_without_scale("backbone.layers.5.mixer.up_proj.weight"),
     "backbone.layers.5.mixer.up_proj.weight"),
    ("extra tensor", _add("backbone.layers.2.mixer.rotary_emb.inv_freq"), "backbone.layers.2.mixer.rotary_emb.inv_freq"),
    ("expert out of range", _add("backbone.layers.1.mixer.experts.6.up_proj.weight"),
     "backbone.layers.1.mixer.experts.6.up_proj.weight"),
    ("nvfp4 tensor", _add("backbone.layers.4.mixer.in_proj.weight_scale_2"), "backbone.layers.4.mixer.in_proj.weight_scale_2"),
    ("scale of a bf16 weight", _add("backbone.layers.2.mixer.q_proj.weight_scale"), "backbone.layers.2.mixer.q_proj.weight_scale"),
]


@pytest.mark.parametrize("edit,name", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_checkpoint_names_the_tensor(hf_dir, tmp_path, edit, name):
    directory = _copy(hf_dir, tmp_path / "ckpt")
    _edit_tensors(directory, edit)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(ModelConfig.from_hf(directory))


def test_missing_shard_and_missing_files_are_reported(hf, tmp_path):
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(ModelConfig.from_hf(tmp_path / "sharded"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_config(PATTERN)))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(ModelConfig.from_hf(tmp_path / "empty"))


def test_the_full_size_preset_checks_free_memory_before_allocating(monkeypatch):
    """On a GPU with too little free memory, loading fails at once with the sizes, before any tensor
    is allocated (CPU-only here: the device query is faked, and a real allocation on cuda would fail)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    with pytest.raises(MemoryError, match=r"need 58\.8 GiB but cuda has 20\.0 GiB free of 80\.0 GiB"):
        load_model(ModelConfig.from_hf("nemotron-3-nano-30b-a3b"), "dummy", device="cuda")
