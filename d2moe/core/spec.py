"""ModelSpec: the shape of an MoE model, from a shipped YAML, a user YAML or an HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import check_keys, read_yaml


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of an MoE transformer that the scheduler and the cost model need.

    `layers` counts MoE layers; `dense_layers` counts leading layers with a dense FFN
    (DeepSeek). Expert matrices are SwiGLU: w1, w3 [ffn, hidden] and w2 [hidden, ffn].
    """

    name: str
    layers: int
    experts: int
    top_k: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    shared_ffn: int = 0  # total intermediate size of always-on shared experts
    dense_layers: int = 0
    dense_ffn: int = 0
    dtype_bytes: int = 2
    non_expert_params_per_layer: int = 0  # 0: computed from attention + router + shared

    def __post_init__(self) -> None:
        for name in ("layers", "experts", "top_k", "hidden", "ffn", "heads", "kv_heads", "vocab"):
            if getattr(self, name) <= 0:
                raise UserError(f"must be a positive integer, got {getattr(self, name)}",
                                path=self.name, field=name, fix="set a positive value")
        if self.top_k > self.experts:
            raise UserError(f"top_k={self.top_k} exceeds experts={self.experts}",
                            path=self.name, field="top_k", fix="use top_k <= experts")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def expert_shapes(self) -> tuple[tuple[int, int], ...]:
        """(out, in) of each expert matrix: w1, w3, w2."""
        return ((self.ffn, self.hidden), (self.ffn, self.hidden), (self.hidden, self.ffn))

    @property
    def expert_params(self) -> int:
        return sum(o * i for o, i in self.expert_shapes)

    @property
    def layer_params(self) -> int:
        """Non-expert parameters of one MoE layer (attention, norms, router, shared experts)."""
        if self.non_expert_params_per_layer:
            return self.non_expert_params_per_layer
        d, hd = self.hidden, self.dim_head
        attn = d * hd * (2 * self.heads + 2 * self.kv_heads)
        return attn + 2 * d + d * self.experts + 3 * d * self.shared_ffn

    @property
    def non_expert_bytes(self) -> int:
        """Bytes of everything but the routed experts at `dtype_bytes`: MoE layers' attention,
        router and shared experts, leading dense layers, embeddings and the LM head."""
        d = self.hidden
        dense = self.dense_layers * (d * self.dim_head * (2 * self.heads + 2 * self.kv_heads)
                                     + 3 * d * self.dense_ffn)
        params = self.layers * self.layer_params + dense + 2 * self.vocab * d
        return params * self.dtype_bytes

    def expert_flops(self, tokens: int) -> int:
        """Multiply-adds x2 of one expert over `tokens` tokens."""
        return 2 * tokens * self.expert_params

    def layer_flops(self, tokens: int) -> int:
        return 2 * tokens * self.layer_params


_SPEC_FIELDS = tuple(f.name for f in fields(ModelSpec))
SHIPPED = ("mixtral-8x7b", "llama-moe-3.5b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b",
           "deepseek-v2-lite", "tiny")


def shipped_specs() -> tuple[str, ...]:
    """Names accepted wherever a model spec is asked for."""
    return SHIPPED


def spec_from_dict(data: dict[str, Any], *, path: str) -> ModelSpec:
    check_keys(data, set(_SPEC_FIELDS), path=path,
               required=("name", "layers", "experts", "top_k", "hidden", "ffn", "heads",
                         "kv_heads", "vocab"))
    for key, value in data.items():
        if key != "name" and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"must be an integer, got {value!r}", path=path, field=key,
                            fix="write a whole number")
    return ModelSpec(**data)


def spec_from_hf_config(cfg: dict[str, Any], *, path: str, name: str = "") -> ModelSpec:
    """Map an HF `config.json` (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V2) onto a ModelSpec."""

    def pick(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is None:
            raise UserError(f"none of {keys} present", path=path, field=keys[0],
                            fix="is this an MoE model's config.json?")
        return default

    layers = int(pick("num_hidden_layers"))
    dense = int(pick("first_k_dense_replace", default=0))
    hidden = int(pick("hidden_size"))
    heads = int(pick("num_attention_heads"))
    shared = int(pick("shared_expert_intermediate_size", default=0))
    if not shared and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * int(pick("moe_intermediate_size"))
    return ModelSpec(
        name=name or str(cfg.get("_name_or_path") or cfg.get("model_type")
                         or Path(path).parent.name),
        layers=layers - dense,
        experts=int(pick("num_local_experts", "num_experts", "n_routed_experts")),
        top_k=int(pick("num_experts_per_tok", "moe_topk")),
        hidden=hidden,
        ffn=int(pick("moe_intermediate_size", "intermediate_size")),
        heads=heads,
        kv_heads=int(pick("num_key_value_heads", default=heads)),
        vocab=int(pick("vocab_size")),
        head_dim=int(cfg.get("head_dim") or 0),
        shared_ffn=shared,
        dense_layers=dense,
        dense_ffn=int(cfg.get("intermediate_size") or 0) if dense else 0,
    )


def load_spec(ref: str | Path) -> ModelSpec:
    """A shipped name (`mixtral-8x7b`), a spec YAML, an HF config.json, or a model directory."""
    ref_s = str(ref)
    if ref_s in SHIPPED:
        text = resources.files("d2moe.core").joinpath("specs", f"{ref_s}.yaml").read_text()
        import yaml

        return spec_from_dict(yaml.safe_load(text), path=f"<shipped {ref_s}>")
    path = Path(ref_s)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"not a shipped spec ({', '.join(SHIPPED)}) nor an existing file",
                        path=ref_s, fix="name a shipped spec or a spec YAML / config.json")
    if path.suffix == ".json":
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed JSON: {exc.msg} at line {exc.lineno}", path=str(path),
                            fix="correct the JSON") from None
        return spec_from_hf_config(cfg, path=str(path))
    return spec_from_dict(read_yaml(path), path=str(path))
