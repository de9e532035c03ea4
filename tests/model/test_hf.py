"""Our Transformer loaded from HF safetensors vs transformers' own implementation."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.model.hf import load_hf  # noqa: E402

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
               eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _hf_model(arch: str):
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, rope_theta=1e4, **_COMMON)
        cls = transformers.MixtralForCausalLM
    elif arch == "olmoe":
        cfg = transformers.OlmoeConfig(num_experts=4, **_COMMON)
        cls = transformers.OlmoeForCausalLM
    else:
        cfg = transformers.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=64,
                                          shared_expert_intermediate_size=96,
                                          tie_word_embeddings=True, **_COMMON)  # tied head
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so that routing and norms matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=["mixtral", "olmoe", "qwen2_moe"])
def pair(request, tmp_path_factory):
    ref = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(d)
    ours, spec = load_hf(d)
    return ref, ours, spec, d


def test_prefill_logits_match_transformers(pair) -> None:
    ref, ours, spec, _ = pair
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    assert got.shape == (2, 16, VOCAB)
    assert (got - want).abs().max().item() < 1e-4, "logits differ from transformers"


def test_cached_decode_matches_transformers(pair) -> None:
    ref, ours, _, _ = pair
    x = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).logits
        cache = ours.new_cache(max_len=32)
        parts = [ours(x[:, :9], cache)]  # prefill, then one token at a time
        parts += [ours(x[:, i:i + 1], cache) for i in range(9, 14)]
    assert cache.length == 14
    assert (torch.cat(parts, dim=1) - want).abs().max().item() < 1e-4


def test_router_style_follows_config(pair) -> None:
    ref, ours, _, _ = pair
    arch = ref.config.model_type
    weights = []
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        ours(x, observer=lambda layer, ids, w: weights.append(w))
    sums = torch.cat(weights).sum(-1)
    if arch == "mixtral":  # softmax over the top-k logits: weights sum to 1
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    else:  # top-k of the full softmax, not renormalised: below 1 with 2 of 4 experts
        assert (sums < 1 - 1e-4).all()


def _rewrite(d, edit) -> str:
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    name = edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def test_missing_tensor_is_a_user_error_naming_it(tmp_path) -> None:
    _hf_model("mixtral").save_pretrained(tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    def drop(t):
        del t[name]
        return name

    _rewrite(tmp_path, drop)
    with pytest.raises(UserError, match=r"experts\.3\.w2\.weight is missing"):
        load_hf(tmp_path)


def test_wrong_shape_is_a_user_error_naming_tensor_and_file(tmp_path) -> None:
    _hf_model("olmoe").save_pretrained(tmp_path)
    name = "model.layers.0.self_attn.k_norm.weight"

    def shrink(t):
        t[name] = t[name][:-1].clone()
        return name

    _rewrite(tmp_path, shrink)
    with pytest.raises(UserError) as err:
        load_hf(tmp_path)
    assert name in str(err.value) and "model.safetensors" in str(err.value)
    assert "expected (32,)" in str(err.value)


def test_not_a_checkpoint_directory(tmp_path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="model_type 'llama' is not supported"):
        load_hf(tmp_path)
    _hf_model("mixtral").config.to_json_file(tmp_path / "config.json")
    with pytest.raises(UserError, match=r"no \*\.safetensors"):
        load_hf(tmp_path)


def test_shipped_tiny_is_a_checkpoint_transformers_reads() -> None:
    from d2moe.model.load import load_tiny, tiny_dir

    if not (tiny_dir() / "model.safetensors").is_file():
        pytest.skip("tiny checkpoint not built yet")
    ours, _ = load_tiny()
    ref = transformers.MixtralForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32).eval()
    x = torch.tensor([list(b"def fib(n):\n    return")])
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < 1e-3


def _tiny_copy(tmp_path):
    """A copy of the shipped tiny checkpoint (config.json + model.safetensors) to damage."""
    import shutil

    from d2moe.model.load import tiny_dir

    if not (tiny_dir() / "model.safetensors").is_file():
        pytest.skip("tiny checkpoint not built yet")
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir() / name, d / name)
    return d


def _cli_error(capsys, argv: list[str], named: str) -> str:
    """Exit 2 with one stderr line naming `named`, no traceback."""
    from d2moe.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and named in err, err
    return err


def _damage(path, how: str) -> None:
    import struct

    blob = bytearray(path.read_bytes())
    if how == "truncated":
        blob = blob[: len(blob) // 2]
    elif how == "empty":
        blob = bytearray()
    elif how == "flipped":
        blob[8 + 5] ^= 0xFF  # a byte of the JSON header: invalid UTF-8
    else:  # oversized: the header length says 1 TiB
        blob[:8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped", "oversized"])
def test_a_damaged_safetensors_file_is_a_user_error_naming_it(tmp_path, capsys, how) -> None:
    d = _tiny_copy(tmp_path)
    st = d / "model.safetensors"
    _damage(st, how)
    with pytest.raises(UserError, match="copy or save it again") as err:
        load_hf(d)
    assert err.value.path == str(st)
    _cli_error(capsys, ["model", "info", "--model", str(d)], str(st))
    _cli_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q"),
                        "--no-progress"], str(st))


def test_a_tensor_read_from_a_file_damaged_later_is_a_user_error(tmp_path) -> None:
    from d2moe.quant.cmd import find_expert_tensors, load_tensor

    d = _tiny_copy(tmp_path)
    found = find_expert_tensors(d)
    path, name = next(iter(found.values()))
    _damage(path, "truncated")  # damaged between listing and reading
    with pytest.raises(UserError, match="damaged") as err:
        load_tensor(path, name)
    assert err.value.path == str(path)


@pytest.mark.parametrize("text, field", [("[1]", None), ('{"model_type": "mixtral", '
                                                        '"rope_scaling": [1]}', "rope_scaling"),
                                         (None, "num_hidden_layers"),
                                         (None, "rms_norm_eps"), (None, "tie_word_embeddings"),
                                         (None, "hidden_act")])
def test_a_bad_config_json_in_a_checkpoint_is_a_user_error(tmp_path, capsys, text,
                                                          field) -> None:
    d = _tiny_copy(tmp_path)
    if text is None:  # the tiny config with one value of the wrong type
        cfg = json.loads((d / "config.json").read_text())
        cfg[field] = "abc"
        text = json.dumps(cfg)
    (d / "config.json").write_text(text)
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert err.value.path == str(d / "config.json") and err.value.field == field
    _cli_error(capsys, ["model", "info", "--model", str(d)], "config.json")
    if field not in ("rms_norm_eps", "tie_word_embeddings", "hidden_act"):  # not quantize's
        _cli_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q"),
                            "--no-progress"], "config.json")


def test_quantize_an_empty_directory_says_no_config_json(tmp_path, capsys) -> None:
    err = _cli_error(capsys, ["quantize", "--model", str(tmp_path), "--out",
                              str(tmp_path / "q")], str(tmp_path))
    assert "no config.json in this directory" in err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -1.0])
def test_a_rope_theta_or_norm_eps_that_is_no_positive_number_is_refused(tmp_path, value):
    d = _tiny_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for key in ("rope_theta", "rms_norm_eps"):
        bad = {**cfg, key: value}
        (d / "config.json").write_text(json.dumps(bad))  # json writes NaN / Infinity
        with pytest.raises(UserError, match=f"field '{key}': must be a finite number > 0"):
            load_hf(d)


@pytest.mark.parametrize("layers", [3, 1000, 10**9])
def test_a_layer_count_the_weights_do_not_hold_is_refused_before_building(tmp_path, layers):
    d = _tiny_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    held = cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    what = (f"says {layers} layers, the weights hold {held}" if layers <= 1024 else
            f"{layers} is larger than any model")  # (the spec's bound comes first)
    with pytest.raises(UserError, match=f"field 'num_hidden_layers': {what}"):
        load_hf(d)  # 10**9 layers would take hours to build before a tensor went missing


def test_max_position_embeddings_is_the_models_limit(tmp_path):
    from d2moe.core.spec import spec_from_hf_config
    from d2moe.model.hf import config_from_hf, hf_config_dict
    from d2moe.model.load import tiny_dir

    cfg = json.loads((tiny_dir() / "config.json").read_text())
    assert config_from_hf(cfg, path="c.json").max_positions == 4096
    for absent in ({k: v for k, v in cfg.items() if k != "max_position_embeddings"},
                   {**cfg, "max_position_embeddings": None}):
        assert config_from_hf(absent, path="c.json").max_positions == 0  # no limit known
    for bad in (0, -1, 4096.5, "4096", True):
        with pytest.raises(UserError, match="field 'max_position_embeddings'"):
            config_from_hf({**cfg, "max_position_embeddings": bad}, path="c.json")
    model_cfg = config_from_hf({**cfg, "max_position_embeddings": 512}, path="c.json")
    spec = spec_from_hf_config(cfg, path="c.json")
    assert hf_config_dict(spec, model_cfg)["max_position_embeddings"] == 512  # kept on save


@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.q_proj.weight",
                                    "model.layers.2.block_sparse_moe.experts.3.w1.weight"])
def test_a_nan_weight_is_named_by_tensor_and_file_in_every_verb(tmp_path, capsys, tensor):
    """Before, generate and run took NaN weights silently (and printed NUL bytes), and
    quantize named neither the tensor nor the file."""
    d = _tiny_copy(tmp_path)
    st = d / "model.safetensors"
    weights = load_file(str(st))
    weights[tensor][0, 1] = float("inf") if "experts" in tensor else float("nan")
    save_file(weights, str(st))
    with pytest.raises(UserError, match="holds NaN or infinite values") as err:
        load_hf(d)
    assert (err.value.path, err.value.field) == (str(st), tensor)
    _cli_error(capsys, ["generate", "--model", str(d), "--max-new-tokens", "2"], tensor)
    if "experts" in tensor:  # quantize reads the experts only
        _cli_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q"),
                            "--no-progress"], f"{st}: field '{tensor}'")
        assert not (tmp_path / "q").exists()


def test_a_hidden_size_the_embedding_does_not_have_is_refused_before_building(tmp_path):
    """config.json's hidden_size is checked against the embedding's header first: 60000
    (a digit too many) would otherwise build 60000x60000 attention matrices (57 GB)."""
    d = _tiny_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 60000}))
    with pytest.raises(UserError, match=r"shape \(256, 192\), config.json says vocab_size "
                                        r"256 x hidden_size 60000") as err:
        load_hf(d)
    assert err.value.field == "model.embed_tokens.weight"


def test_a_weight_beyond_float16_is_named_as_the_dtype_s_fault_not_the_checkpoint_s(tmp_path):
    d = _tiny_copy(tmp_path)
    st = d / "model.safetensors"
    weights = load_file(str(st))
    name = "model.layers.0.self_attn.o_proj.weight"
    weights[name] = weights[name].float()
    weights[name][0, 0] = 1e5  # finite, past float16's 65504
    save_file(weights, str(st))
    load_hf(d)  # float32: fine
    with pytest.raises(UserError, match="beyond float16's range") as err:
        load_hf(d, dtype=torch.float16)
    assert err.value.field == name and "--dtype" in err.value.fix
