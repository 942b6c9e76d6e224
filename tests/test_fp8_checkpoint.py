"""save_fp8_checkpoint / load_fp8_checkpoint: the DeepSeek-V3 / Qwen3-FP8 layout, bit-exact round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import helpers  # noqa: F401
from helpers.fp8 import Fp8Linear, load_fp8_checkpoint, quantize_model, save_fp8_checkpoint

FP8 = torch.float8_e4m3fn


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


class _Net(nn.Module):
    """Ragged shapes on purpose: 200 -> 72 -> 300, a norm, an embedding and a head that stay high precision."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 200)
        self.up = nn.Linear(200, 72)
        self.down = nn.Linear(72, 300, bias=False)
        self.norm = nn.LayerNorm(300)
        self.lm_head = nn.Linear(300, 40)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.down(torch.relu(self.up(self.embed(ids))))))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return _Net()


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_round_trip_bit_exact_with_engine_layout(tmp_path, scale_fmt):
    from safetensors import safe_open

    model = quantize_model(_net(), scale_fmt=scale_fmt, backend="torch")
    out = save_fp8_checkpoint(model, tmp_path / "ckpt", config={"model_type": "toy", "hidden_size": 200})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    config = json.loads((out / "config.json").read_text())
    expected = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if scale_fmt == "ue8m0":
        expected["scale_fmt"] = "ue8m0"
    assert config == {"model_type": "toy", "hidden_size": 200, "quantization_config": expected}

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("up.weight").dtype == FP8 and tuple(f.get_tensor("up.weight").shape) == (72, 200)
        assert tuple(f.get_tensor("up.weight_scale_inv").shape) == (1, 2)
        assert f.get_tensor("up.weight_scale_inv").dtype == torch.float32
        assert tuple(f.get_tensor("down.weight_scale_inv").shape) == (3, 1)  # ceil(300/128), ceil(72/128)
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # kept high precision
    assert keys == {"embed.weight", "up.weight", "up.weight_scale_inv", "up.bias", "down.weight",
                    "down.weight_scale_inv", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"}

    # Into a fresh high-precision model of the same architecture: the FP8 layers are rebuilt from the file.
    loaded = load_fp8_checkpoint(out, _net(seed=1))
    assert isinstance(loaded.up, Fp8Linear) and loaded.up.scale_fmt == scale_fmt
    assert isinstance(loaded.lm_head, nn.Linear) and not isinstance(loaded.lm_head, Fp8Linear)
    ref_state = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == ref_state[key].dtype and value.shape == ref_state[key].shape, key
        assert torch.equal(bits(value), bits(ref_state[key])), key
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(loaded(ids), model(ids))

    # Into an FP8 model, and as raw tensors + config.
    again = load_fp8_checkpoint(out, quantize_model(_net(seed=2), scale_fmt=scale_fmt, backend="torch"))
    assert torch.equal(bits(again.down.weight), bits(model.down.weight))
    tensors, cfg = load_fp8_checkpoint(out)
    assert set(tensors) == keys and cfg["quantization_config"] == expected


def test_save_and_load_reject_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no Fp8Linear"):
        save_fp8_checkpoint(_net(), tmp_path / "a")
    model = quantize_model(_net(), backend="torch")
    model.down = Fp8Linear.from_linear(nn.Linear(72, 300), block_size=(64, 64), backend="torch")
    with pytest.raises(ValueError, match="weight_block_size"):
        save_fp8_checkpoint(model, tmp_path / "b")
    out = save_fp8_checkpoint(quantize_model(_net(), backend="torch"), tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method"):
        load_fp8_checkpoint(out)


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_kv_scales_round_trip_under_the_engine_names(tmp_path, granularity):
    from safetensors import safe_open

    from helpers.kvcache import Fp8KVCache, calibrate_kv_scales, load_kv_scales
    from helpers.models import Decoder, DecoderConfig

    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=32, d_ff=64,
                        max_seq_len=32, qk_norm=False)
    model = Decoder(cfg).eval()
    scales = calibrate_kv_scales(model, [torch.randint(0, 40, (3, 9))], policy="nemo_rl", granularity=granularity)
    fp8 = quantize_model(model, backend="torch")
    out = save_fp8_checkpoint(fp8, tmp_path / "ckpt", config={"model_type": "toy"}, kv_scales=scales)
    want_shape = {"k": () if granularity == "tensor" else (2,), "q": () if granularity == "tensor" else (4,)}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for i in range(2):
            for name in ("k", "v", "q"):
                t = f.get_tensor(f"layers.{i}.self_attn.{name}_scale")
                assert t.dtype == torch.float32 and tuple(t.shape) == want_shape["q" if name == "q" else "k"]
                assert torch.equal(t, getattr(scales, name)[i])
    back = load_kv_scales(out)
    assert torch.equal(back.q, scales.q) and torch.equal(back.k, scales.k) and torch.equal(back.v, scales.v)
    assert back == scales and back.equal(scales)
    torch.manual_seed(1)
    loaded = load_fp8_checkpoint(out, Decoder(cfg).eval())  # the scales are skipped by the module load
    ids = torch.randint(0, 40, (2, 6))
    assert torch.equal(loaded(ids), fp8(ids))
    cache = Fp8KVCache.from_config(cfg, 2, 12, granularity=granularity, scales=back)  # and go straight into a cache
    assert torch.equal(cache.k_scale, scales.k)
    assert load_kv_scales(save_fp8_checkpoint(fp8, tmp_path / "plain")) is None
    hf = save_fp8_checkpoint(fp8, tmp_path / "hf", kv_scales=scales, kv_scale_prefix="model.layers.{i}.self_attn.")
    assert torch.equal(load_kv_scales(hf, kv_scale_prefix="model.layers.{i}.self_attn.").k, scales.k)


def test_kv_scales_are_checked_against_the_model(tmp_path):
    from helpers.kvcache import KVScales, load_kv_scales
    from helpers.models import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=32, d_ff=64,
                        max_seq_len=32)
    fp8 = quantize_model(Decoder(cfg).eval(), backend="torch")
    three_layers = KVScales.unit(3)
    with pytest.raises(ValueError, match="kv_scales.q covers 3 layers, the model has 2 attention layers"):
        save_fp8_checkpoint(fp8, tmp_path / "a", kv_scales=three_layers)
    wrong_heads = KVScales(torch.ones(2, 4), torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="kv_scales.k has 3 per-head scales, the model has 2 KV heads"):
        save_fp8_checkpoint(fp8, tmp_path / "b", kv_scales=wrong_heads)
    with pytest.raises(ValueError, match="kv_scales must be a helpers.kvcache.KVScales"):
        save_fp8_checkpoint(fp8, tmp_path / "c", kv_scales=[1.0, 1.0])
    assert not (tmp_path / "a").exists()  # nothing written on a refused call
    # Plain tensors in a mapping are accepted and read back as the same KVScales.
    plain = {"q": torch.full((2, 4), 0.5), "k": torch.full((2, 2), 0.25), "v": torch.full((2, 2), 0.125)}
    out = save_fp8_checkpoint(fp8, tmp_path / "d", kv_scales=plain)
    assert load_kv_scales(out) == KVScales(plain["q"], plain["k"], plain["v"])
    # A model that carries no layer / head counts cannot be checked: refused, with the reason.
    lin = quantize_model(nn.Sequential(nn.Linear(256, 256)), backend="torch")
    with pytest.raises(ValueError, match="cannot check kv_scales against Sequential"):
        save_fp8_checkpoint(lin, tmp_path / "e", kv_scales=plain)
