"""Find and load a model by reference: `tiny` (the shipped checkpoint) or an HF directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from d2moe.core.errors import UserError
from d2moe.core.spec import ModelSpec, load_spec
from d2moe.model.hf import load_hf
from d2moe.model.transformer import Transformer

_SIZE_FIELDS = ("layers", "experts", "top_k", "hidden", "ffn", "heads", "kv_heads", "vocab",
                "dim_head")


def tiny_dir() -> Path:
    """The package directory holding the shipped tiny checkpoint (HF Mixtral layout)."""
    return Path(__file__).resolve().parent / "tiny"


def checkpoint_dir(ref: str | Path) -> Path:
    """The checkpoint directory a model reference names (`tiny`: the shipped one)."""
    return tiny_dir() if str(ref) == "tiny" else Path(ref)


def check_model_ref(ref: str | Path) -> Path:
    """The checkpoint directory `--model` names (`tiny`: the shipped one); an empty name, a
    path that is not there, a file or a directory without config.json is a UserError naming
    it, before anything asks for a store or a spec of it."""
    if str(ref) == "tiny":
        return tiny_dir()
    fix = "pass --model tiny or an HF checkpoint directory (config.json + *.safetensors)"
    if not str(ref).strip():
        raise UserError("no model given", field="model", fix=fix)
    path = Path(ref)
    if not path.exists():
        raise UserError("no such directory", path=str(ref), field="model", fix=fix)
    if not path.is_dir():
        raise UserError("is a file, not a checkpoint directory", path=str(ref), field="model",
                        fix=fix)
    if not (path / "config.json").is_file():
        raise UserError("no config.json in this directory", path=str(ref), field="model",
                        fix=fix)
    return path


def tiny_provenance() -> dict[str, Any]:
    """The shipped tiny checkpoint's provenance record (command, date, machine, perplexity)."""
    path = tiny_dir() / "provenance.json"
    if not path.is_file():
        raise UserError("the tiny checkpoint has no provenance.json", path=str(path),
                        fix="rebuild it: d2moe model train-tiny")
    return json.loads(path.read_text())


def load_tiny(*, dtype: torch.dtype = torch.float32,
              with_experts: bool = True) -> tuple[Transformer, ModelSpec]:
    """The shipped tiny model (weights stored fp16, computed in `dtype`) and its spec."""
    d = tiny_dir()
    if not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
        raise UserError("the built-in tiny checkpoint is missing", path=str(d),
                        fix="train it: d2moe model train-tiny (about 10 minutes on 2 cores)")
    model, found = load_hf(d, dtype=dtype, with_experts=with_experts)
    spec = load_spec("tiny")
    for name in _SIZE_FIELDS:
        if getattr(found, name) != getattr(spec, name):
            raise UserError(f"checkpoint has {name}={getattr(found, name)}, tiny.yaml says "
                            f"{getattr(spec, name)}", path=str(d / "config.json"), field=name,
                            fix="retrain: d2moe model train-tiny")
    model.spec = spec
    return model, spec


def load_model(ref: str | Path, *, dtype: torch.dtype = torch.float32,
               with_experts: bool = True) -> tuple[Transformer, ModelSpec]:
    """`tiny` or an HF checkpoint directory -> (model, spec)."""
    if str(ref) == "tiny":
        return load_tiny(dtype=dtype, with_experts=with_experts)
    return load_hf(check_model_ref(ref), dtype=dtype, with_experts=with_experts)
