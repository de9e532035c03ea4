"""HF safetensors checkpoints <-> `Transformer`: Mixtral, OLMoE and Qwen-MoE tensor names.

Reads `config.json` through `d2moe.core.spec.spec_from_hf_config`, then copies every tensor
into the model, checking that each expected tensor exists with the expected shape. Nothing
is downloaded: the argument is a local directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.core.spec import ModelSpec, read_hf_config, require_mapping, spec_from_hf_config
from d2moe.model.config import ModelConfig
from d2moe.model.hf_names import MOE_NAMES, check_model_type
from d2moe.model.transformer import Transformer

_FIX_DAMAGED = "the checkpoint file is damaged: copy or save it again"


def config_from_hf(cfg: Any, *, path: str) -> ModelConfig:
    """The architecture details of an HF config.json (transformers 4.x and 5.x keys)."""
    cfg = require_mapping(cfg, path=path)
    arch = check_model_type(cfg, path=path)
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = cfg.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise UserError(f"must be a mapping or null, got {rope!r}", path=path, field=rope_key,
                        fix="write {\"rope_type\": \"default\", ...} or null")
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope_type {rope['rope_type']!r} is not supported", path=path,
                        field="rope_parameters", fix="only plain RoPE is implemented")
    theta = _number(rope, "rope_theta", path) or _number(cfg, "rope_theta", path) or 10000.0
    if cfg.get("clip_qkv") is not None:
        raise UserError("clip_qkv is not supported", path=path, field="clip_qkv",
                        fix="use a checkpoint with clip_qkv: null")
    if arch == "qwen2_moe" and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1)
                                != 1 or cfg.get("use_sliding_window")):
        raise UserError("dense-MLP layers and sliding windows are not supported", path=path,
                        field="mlp_only_layers", fix="use a checkpoint with an MoE every layer")
    act = cfg.get("hidden_act", "silu")  # the experts and shared experts are SwiGLU
    if act not in ("silu", "swish"):
        raise UserError(f"hidden_act {act!r} is not supported", path=path, field="hidden_act",
                        fix="only SwiGLU experts (hidden_act silu) are implemented")
    default_renorm = arch == "mixtral"  # Mixtral always renormalises; others follow the flag
    eps = _number(cfg, "rms_norm_eps", path)
    positions = _number(cfg, "max_position_embeddings", path)
    if positions is not None and positions != int(positions):
        raise UserError(f"must be a whole number, got {positions!r}", path=path,
                        field="max_position_embeddings", fix="write a whole number")
    return ModelConfig(
        rope_theta=theta, norm_eps=1e-5 if eps is None else eps,
        renormalize_topk=_flag(cfg, "norm_topk_prob", default_renorm, path),
        tie_embeddings=_flag(cfg, "tie_word_embeddings", False, path),
        qk_norm=arch == "olmoe",
        qkv_bias=arch == "qwen2_moe" and _flag(cfg, "qkv_bias", True, path),
        shared_expert_gate=arch == "qwen2_moe", arch=arch,
        max_positions=int(positions or 0))


def _number(cfg: dict[str, Any], key: str, path: str) -> float | None:
    """config.json's `key` as a float > 0, None when absent or null; anything else (a string,
    0, a negative, NaN or infinity: rope_theta and rms_norm_eps are both) names the key."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise UserError(f"must be a finite number > 0, got {value!r}", path=path, field=key,
                        fix="write a number (this key of the model's HF config.json)")
    return float(value)


def _flag(cfg: dict[str, Any], key: str, default: bool, path: str) -> bool:
    """config.json's `key` as a bool (absent or null: `default`); "false" is not a flag."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"must be true or false, got {value!r}", path=path, field=key,
                        fix="write true or false (this key of the model's HF config.json)")
    return value


@contextlib.contextmanager
def reading_checkpoint(path: Path) -> Iterator[None]:
    """Turn safetensors' and the OS's errors while reading `path` into a UserError naming
    the file: a truncated, emptied or corrupted *.safetensors is bad input, not a bug."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise UserError(f"cannot read the safetensors file ({reason})", path=str(path),
                        fix=_FIX_DAMAGED) from None


def tensor_map(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, our tensor, a view sharing storage) for every tensor of the checkpoint."""
    spec, cfg = model.spec, model.cfg
    moe_name, (n1, n3, n2) = MOE_NAMES[cfg.arch]
    yield "model.embed_tokens.weight", model.embed_tokens.weight
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", block.input_layernorm.weight
        yield p + "post_attention_layernorm.weight", block.post_attention_layernorm.weight
        attn = block.self_attn
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, proj)
            yield f"{p}self_attn.{proj}.weight", lin.weight
            if lin.bias is not None:
                yield f"{p}self_attn.{proj}.bias", lin.bias
        if attn.q_norm is not None:
            yield p + "self_attn.q_norm.weight", attn.q_norm.weight
            yield p + "self_attn.k_norm.weight", attn.k_norm.weight
        yield f"{p}{moe_name}.gate.weight", block.moe.gate.weight
        shared = block.moe.shared
        if shared is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield f"{p}{moe_name}.shared_expert.{proj}.weight", getattr(shared, proj).weight
            if shared.gate is not None:
                yield f"{p}{moe_name}.shared_expert_gate.weight", shared.gate.weight
        if model.experts is not None:
            for e in range(spec.experts):
                w1, w3, w2 = model.experts.expert(i, e)
                for hf, ours in ((n1, w1), (n3, w3), (n2, w2)):
                    yield f"{p}{moe_name}.experts.{e}.{hf}.weight", ours
    yield "model.norm.weight", model.norm.weight
    if not cfg.tie_embeddings:
        yield "lm_head.weight", model.lm_head.weight


def _index(model_dir: Path) -> dict[str, Path]:
    """{tensor name: file} over the directory's *.safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError("no *.safetensors files", path=str(model_dir),
                        fix="point at an HF checkpoint directory saved as safetensors")
    where: dict[str, Path] = {}
    for path in files:
        with reading_checkpoint(path), safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                where[name] = path
    return where


def _check_layer_count(raw: dict[str, Any], where: dict[str, Path], path: Path) -> None:
    """config.json's num_hidden_layers against the layers the weights hold (tensor names
    `model.layers.N.*`): a config that says fewer would ignore weights, one that says more
    would build layers (seconds to hours) before a tensor is found missing."""
    held = {int(m.group(1)) for name in where
            if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    said = raw.get("num_hidden_layers")
    if held and said != max(held) + 1:
        raise UserError(f"says {said} layers, the weights hold {max(held) + 1}", path=str(path),
                        field="num_hidden_layers",
                        fix="config.json and the weights disagree: use the checkpoint's own "
                            "config.json")


def _check_embedding(spec: ModelSpec, where: dict[str, Path]) -> None:
    """The embedding's shape in its file's header against config.json's vocab_size and
    hidden_size, before a model of those sizes is built (a hidden_size with a digit too many
    would allocate its matrices first)."""
    from safetensors import safe_open

    name = "model.embed_tokens.weight"
    if name not in where:
        return  # named as missing once the model is built (cheap then: it is small)
    with reading_checkpoint(where[name]), safe_open(str(where[name]), framework="pt") as f:
        shape = tuple(f.get_slice(name).get_shape())
    if shape != (spec.vocab, spec.hidden):
        raise UserError(f"tensor {name} has shape {shape}, config.json says vocab_size "
                        f"{spec.vocab} x hidden_size {spec.hidden}", path=str(where[name]),
                        field=name, fix="config.json and the weights disagree: use the "
                        "checkpoint's own config.json")


def read_config(model_dir: str | Path) -> tuple[ModelSpec, ModelConfig, dict[str, Any]]:
    """(spec, config, raw dict) of a checkpoint directory's config.json."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir() or not path.is_file():
        raise UserError("not a checkpoint directory (no config.json)", path=str(model_dir),
                        fix="pass a directory holding config.json and *.safetensors")
    raw = read_hf_config(path)
    cfg = config_from_hf(raw, path=str(path))
    spec = spec_from_hf_config(raw, path=str(path), name=str(raw.get("_name_or_path") or ""))
    return spec, cfg, raw


def load_hf(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
            with_experts: bool = True) -> tuple[Transformer, ModelSpec]:
    """Build a `Transformer` from an HF checkpoint directory (config.json + *.safetensors).

    `with_experts=False` skips the routed experts (a streaming backend supplies them).
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    spec, cfg, raw = read_config(model_dir)
    where = _index(model_dir)
    _check_layer_count(raw, where, model_dir / "config.json")  # before building them
    _check_embedding(spec, where)  # hidden and vocab: before building matrices of them
    # Built on the CPU, not the meta device: meta's first use imports torch's decompositions
    # (seconds). The expert tensors are torch.empty, so building costs little beyond them.
    model = Transformer(spec, cfg, with_experts=with_experts).to(dtype)
    handles: dict[Path, Any] = {}
    try:
        with torch.no_grad():
            for name, target in tensor_map(model):
                if name not in where:
                    raise UserError(f"tensor {name} is missing", path=str(model_dir),
                                    field=name, fix="is the checkpoint complete and of model_type "
                                    f"{cfg.arch}?")
                file = where[name]
                with reading_checkpoint(file):
                    if file not in handles:
                        handles[file] = safe_open(str(file), framework="pt")
                    shape = tuple(handles[file].get_slice(name).get_shape())
                    if shape != tuple(target.shape):
                        raise UserError(f"tensor {name} has shape {shape}, expected "
                                        f"{tuple(target.shape)} from config.json",
                                        path=str(file), field=name,
                                        fix="config.json and the weights disagree")
                    src = handles[file].get_tensor(name)
                if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                    raise UserError(f"tensor {name} holds NaN or infinite values",
                                    path=str(file), field=name,
                                    fix="the checkpoint is damaged: convert or copy it again")
                target.copy_(src)
                if target.dtype == torch.float16 and src.dtype != torch.float16 \
                        and not bool(torch.isfinite(target).all()):  # past 65504
                    raise UserError(f"tensor {name} holds values beyond float16's range",
                                    path=str(file), field=name,
                                    fix="load it in bfloat16 or float32 (--dtype)")
    finally:
        handles.clear()
    return model.eval(), spec


def hf_config_dict(spec: ModelSpec, cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """An HF config.json (Mixtral schema) for a model of these sizes."""
    if cfg.arch != "mixtral" or spec.shared_ffn:
        raise UserError("only Mixtral-schema configs are written", field="arch",
                        fix="save a Mixtral-style model")
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "_name_or_path": spec.name, "hidden_size": spec.hidden,
            "intermediate_size": spec.ffn, "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
            "head_dim": spec.dim_head, "num_local_experts": spec.experts,
            "num_experts_per_tok": spec.top_k, "vocab_size": spec.vocab,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_positions or 4096, "sliding_window": None,
            "torch_dtype": "float16",
            **extra}


def save_hf(model: Transformer, out_dir: str | Path, *, dtype: torch.dtype = torch.float16,
            extra_config: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (HF Mixtral naming) atomically into out_dir."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensor_map(model)}
    blob = save(tensors, metadata={"format": "pt"})
    with atomic_write(out_dir / "model.safetensors", "wb") as f:
        f.write(blob)
    with atomic_write(out_dir / "config.json") as f:
        json.dump(hf_config_dict(model.spec, model.cfg, **(extra_config or {})), f, indent=2)
        f.write("\n")
    return out_dir

