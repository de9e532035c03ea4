"""ModelSpec: the shape of an MoE model, from a shipped YAML, a user YAML or an HF config.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import check_keys, malformed_json, read_yaml


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
        """Refuse sizes that make no model (specs built in code; the file readers check
        first, so that their errors name the file)."""
        check_sizes(self.__dict__, path=self.name)

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
_DEFAULTS = {f.name: f.default for f in fields(ModelSpec) if f.default is not MISSING}
_POSITIVE = ("layers", "experts", "top_k", "hidden", "ffn", "heads", "kv_heads", "vocab",
             "dtype_bytes")
_NON_NEGATIVE = ("head_dim", "shared_ffn", "dense_layers", "dense_ffn",
                 "non_expert_params_per_layer")
# Upper bounds far above any real MoE (the largest: 256 experts, hidden 7168, vocabulary
# 256K), so that a typo (an extra digit, 6e20) is an error naming its key rather than an
# allocation of terabytes or an int64 overflow deep inside the simulator.
_AT_MOST = {"layers": 1024, "experts": 4096, "hidden": 1 << 16, "ffn": 1 << 20,
            "heads": 1024, "kv_heads": 1024, "vocab": 1 << 24, "dtype_bytes": 8,
            "head_dim": 1 << 13, "shared_ffn": 1 << 20, "dense_layers": 1024,
            "dense_ffn": 1 << 20, "non_expert_params_per_layer": 1 << 40}
SHIPPED = ("mixtral-8x7b", "llama-moe-3.5b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b",
           "deepseek-v2-lite", "tiny")


def check_sizes(values: Mapping[str, Any], *, path: str,
                names: Mapping[str, str] | None = None) -> None:
    """Raise UserError unless every ModelSpec field in `values` makes a model.

    Sizes and `dtype_bytes` must be >= 1; the optional sizes (0: derived or absent) >= 0;
    none above `_AT_MOST`.
    Attention must split evenly: hidden into heads (when head_dim is derived), heads into
    kv_heads groups; otherwise the model would fail to build, or the sizes be wrong.
    `path` names the file the values came from (the spec's name when built in code), and
    `names` maps a field to the key the file spells it with (an HF config.json's)."""
    names = names or {}
    for name in (*_POSITIVE, *_NON_NEGATIVE):
        value, least = values[name], 1 if name in _POSITIVE else 0
        if value < least:
            kind = "a positive integer" if least else "an integer >= 0"
            raise UserError(f"must be {kind}, got {value}", path=path,
                            field=names.get(name, name), fix=f"set a value >= {least}")
        if value > _AT_MOST.get(name, value):  # top_k: at most experts, below
            raise UserError(f"{value} is larger than any model this tool runs (at most "
                            f"{_AT_MOST[name]})", path=path, field=names.get(name, name),
                            fix="check the value (a digit too many?)")
    if values["top_k"] > values["experts"]:
        raise UserError(f"top_k={values['top_k']} exceeds experts={values['experts']}",
                        path=path, field=names.get("top_k", "top_k"), fix="use top_k <= experts")
    heads, kv_heads, hidden = values["heads"], values["kv_heads"], values["hidden"]
    if not values["head_dim"] and hidden % heads:  # the derived head_dim must be whole
        raise UserError(f"hidden={hidden} is not divisible by heads={heads} (head_dim is "
                        "derived as hidden // heads)", path=path,
                        field=names.get("heads", "heads"),
                        fix="use a number of heads that divides hidden, or set head_dim")
    if heads % kv_heads:  # grouped-query attention shares each KV head among whole groups
        raise UserError(f"heads={heads} is not a multiple of kv_heads={kv_heads}", path=path,
                        field=names.get("kv_heads", "kv_heads"),
                        fix="use a kv_heads that divides heads")


def _build(values: dict[str, Any], *, path: str,
           names: Mapping[str, str] | None = None) -> ModelSpec:
    """A ModelSpec whose size errors name the file `path` (not only the spec's name)."""
    check_sizes({**_DEFAULTS, **values}, path=path, names=names)
    return ModelSpec(**values)


def shipped_specs() -> tuple[str, ...]:
    """Names accepted wherever a model spec is asked for."""
    return SHIPPED


def spec_from_dict(data: dict[str, Any], *, path: str) -> ModelSpec:
    """A ModelSpec from parsed YAML/JSON, strictly: unknown or missing keys and non-integer
    sizes are UserErrors naming `path` and the field."""
    check_keys(data, set(_SPEC_FIELDS), path=path,
               required=("name", "layers", "experts", "top_k", "hidden", "ffn", "heads",
                         "kv_heads", "vocab"))
    for key, value in data.items():
        if key != "name" and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"must be an integer, got {value!r}", path=path, field=key,
                            fix="write a whole number")
    return _build(dict(data), path=path)


def hf_int(cfg: Mapping[str, Any], key: str, *, path: str, default: int | None = None) -> int:
    """config.json's `key` as an int (null or absent: `default`); a string, a bool or a
    fraction is a UserError naming the file and the key, never a ValueError from int()."""
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    whole = (isinstance(value, int) and not isinstance(value, bool)
             or isinstance(value, float) and value.is_integer())  # inf, nan: not integers
    if not whole:
        raise UserError(f"must be a whole number, got {value!r}", path=path, field=key,
                        fix="write a whole number (this key of the model's HF config.json)")
    return int(value)


def spec_from_hf_config(cfg: Any, *, path: str, name: str = "") -> ModelSpec:
    """Map an HF `config.json` (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V2) onto a ModelSpec."""
    cfg = require_mapping(cfg, path=path)
    used: dict[str, str] = {}  # ModelSpec field -> the config.json key it came from

    def pick(field: str, *keys: str, default: int | None = None) -> int:
        key = next((k for k in keys if cfg.get(k) is not None), None)
        if key is None and default is None:
            raise UserError(f"none of {keys} present", path=path, field=keys[0],
                            fix="is this an MoE model's config.json?")
        used[field] = key or keys[0]
        return hf_int(cfg, key or keys[0], path=path, default=default)

    layers = pick("layers", "num_hidden_layers")
    dense = pick("dense_layers", "first_k_dense_replace", default=0)
    heads = pick("heads", "num_attention_heads")
    shared = pick("shared_ffn", "shared_expert_intermediate_size", default=0)
    if not shared and cfg.get("n_shared_experts"):
        shared = (hf_int(cfg, "n_shared_experts", path=path)
                  * pick("shared_ffn", "moe_intermediate_size"))
    values = dict(
        name=name or str(cfg.get("_name_or_path") or cfg.get("model_type")
                         or Path(path).parent.name),
        layers=layers - dense,
        experts=pick("experts", "num_local_experts", "num_experts", "n_routed_experts"),
        top_k=pick("top_k", "num_experts_per_tok", "moe_topk"),
        hidden=pick("hidden", "hidden_size"),
        ffn=pick("ffn", "moe_intermediate_size", "intermediate_size"),
        heads=heads,
        kv_heads=pick("kv_heads", "num_key_value_heads", default=heads),
        vocab=pick("vocab", "vocab_size"),
        head_dim=pick("head_dim", "head_dim", default=0),
        shared_ffn=shared,
        dense_layers=dense,
        dense_ffn=pick("dense_ffn", "intermediate_size", default=0) if dense else 0,
    )
    return _build(values, path=path, names=used)


def require_mapping(data: Any, *, path: str) -> dict[str, Any]:
    """`data` if it is a JSON object; else a UserError naming the file (a list or a number
    is valid JSON but no config.json)."""
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object at top level, got {type(data).__name__}",
                        path=path, fix="give the model's HF config.json ({\"model_type\": ...})")
    return data


def read_hf_config(path: Path) -> dict[str, Any]:
    """An HF config.json as a dict: malformed JSON, non-UTF-8 bytes or a non-object are
    UserErrors naming the file."""
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(malformed_json(exc), path=str(path),
                        fix="correct the JSON") from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", path=str(path),
                        fix="give the model's HF config.json (a UTF-8 JSON file)") from None
    return require_mapping(cfg, path=str(path))


def load_spec(ref: str | Path) -> ModelSpec:
    """A shipped name (`mixtral-8x7b`), a spec YAML, an HF config.json, or a model directory."""
    ref_s = str(ref)
    if not ref_s.strip():  # Path('') is '.', a directory: say what is missing instead
        raise UserError("no model spec given", field="model-spec",
                        fix=f"name a shipped spec ({', '.join(SHIPPED)}), a spec YAML or an HF "
                            "config.json")
    if ref_s in SHIPPED:
        text = resources.files("d2moe.core").joinpath("specs", f"{ref_s}.yaml").read_text()
        import yaml

        return spec_from_dict(yaml.safe_load(text), path=f"<shipped {ref_s}>")
    path = Path(ref_s)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError("no config.json in this directory", path=ref_s,
                            fix="pass a checkpoint directory holding config.json, a spec "
                                "YAML or a shipped spec name")
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"not a shipped spec ({', '.join(SHIPPED)}) nor an existing file",
                        path=ref_s, fix="name a shipped spec or a spec YAML / config.json")
    if path.suffix == ".json":
        return spec_from_hf_config(read_hf_config(path), path=str(path))
    return spec_from_dict(read_yaml(path), path=str(path))
