"""calibrate_kv_scales: hooks capture q/k/v after QK-norm and RoPE; the unit, vLLM and NeMo-RL policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import helpers  # noqa: F401
from helpers.fp8 import quantize_model
from helpers.kvcache import KVScalePolicy, calibrate_kv_scales, capture_qkv
from helpers.models import Decoder, DecoderConfig


def _model(seed=0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(**{"vocab_size": 31, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "head_dim": 8,
                           "d_model": 32, "d_ff": 48, "max_seq_len": 32, **kw})
    return Decoder(cfg).eval()


def _batches(n=3, b=2, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 31, (b, t), generator=g) for _ in range(n)]


def _captured_amax(model, batches):
    """[n_batches, n_layer, 3] per-batch amax of |q|, |k|, |v| from the capture hooks."""
    out = []
    with capture_qkv(model) as cap:
        for ids in batches:
            model(ids)
            out.append([[float(x.abs().max()) for x in cap[i][:3]] for i in range(model.cfg.n_layer)])
    return np.array(out)


def test_capture_sees_every_layer_and_removes_its_hooks():
    model = _model()
    with capture_qkv(model) as cap:
        model(_batches(1)[0])
        assert sorted(cap) == [0, 1, 2]
        q, k, v, mask = cap[2]
        assert q.shape == (2, 4, 6, 8) and k.shape == v.shape == (2, 2, 6, 8) and mask.shape == (2, 6)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_nemo_rl_policy_is_batch_p999_of_amax_times_105_over_448():
    model = _model(qk_norm=False)
    batches = _batches(3)
    amax = _captured_amax(model, batches)  # [3, L, 3]
    s = calibrate_kv_scales(model, batches, policy="nemo_rl")
    want = 1.05 * np.percentile(amax, 99.9, axis=0) / 448.0  # [L, 3]
    for j, name in enumerate("qkv"):
        np.testing.assert_allclose(getattr(s, name).numpy(), want[:, j], rtol=1e-6)
    assert s.k.shape == (3,) and s.granularity == "tensor"


def test_vllm_policy_uses_the_first_batch_only():
    model = _model(qk_norm=False)
    batches = _batches(2)
    huge = [batches[0], batches[1] * 0 + 7]
    s = calibrate_kv_scales(model, huge, policy="vllm")
    amax = _captured_amax(model, batches[:1])[0]  # [L, 3]
    np.testing.assert_allclose(s.q.numpy(), amax[:, 0] / 200.0, rtol=1e-6)
    np.testing.assert_allclose(s.k.numpy(), amax[:, 1] / 200.0, rtol=1e-6)
    np.testing.assert_allclose(s.v.numpy(), amax[:, 2] / 100.0, rtol=1e-6)


def test_unit_policy_never_runs_the_model():
    def no_batches():
        raise AssertionError("the unit policy must not consume calibration batches")
        yield

    s = calibrate_kv_scales(_model(), no_batches(), policy="unit", granularity="head")
    assert torch.equal(s.k, torch.ones(3, 2)) and torch.equal(s.q, torch.ones(3, 4))


def test_padding_is_ignored():
    model = _model(qk_norm=False)
    rows = [torch.randint(0, 31, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 3, 4)]
    padded = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, r in enumerate(rows):
        padded[i, 6 - r.shape[1]:] = r[0]
        mask[i, 6 - r.shape[1]:] = True
    padded[1, 0] = 30  # a padding token id that a real row never has at that place
    max_policy = KVScalePolicy("max", "every_step")  # amax / 448, max over batches
    a = calibrate_kv_scales(model, [(padded, mask)], policy=max_policy, granularity="head")
    b = calibrate_kv_scales(model, rows, policy=max_policy, granularity="head")
    for name in "qkv":  # left padding does not change the real tokens' q / k / v (up to fp32 rounding)
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=0)


def test_scales_follow_the_weights_without_qk_norm_but_not_with_it():
    """After a "weight update" that triples W_k, recalibration triples k_scale - unless QK-norm removes it."""
    batches = _batches(2)
    for qk_norm in (False, True):
        model = _model(qk_norm=qk_norm)
        before = calibrate_kv_scales(model, batches)
        with torch.no_grad():
            for blk in model.layers:
                blk.self_attn.k_proj.weight.mul_(3.0)
        after = calibrate_kv_scales(model, batches)
        ratio = after.k / before.k
        torch.testing.assert_close(ratio, torch.full((3,), 1.0 if qk_norm else 3.0), rtol=1e-3, atol=0)
        torch.testing.assert_close(after.v, before.v)


def test_calibration_runs_on_an_fp8_model_and_restores_training_mode():
    model = quantize_model(_model(), backend="torch").train()
    s = calibrate_kv_scales(model, _batches(2), policy="p99.9", granularity="head")
    assert model.training and s.q.shape == (3, 4) and bool((s.k > 0).all())


def test_bad_inputs():
    with pytest.raises(ValueError, match="CoreAttention"):
        with capture_qkv(nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="Decoder"):
        calibrate_kv_scales(nn.Linear(2, 2), _batches(1))
    with pytest.raises(ValueError, match="at least one"):
        calibrate_kv_scales(_model(), [])
    with pytest.raises(ValueError, match="policy must be one of"):
        calibrate_kv_scales(_model(), _batches(1), policy="dynamic")


def test_batches_are_checked_with_errors_that_name_the_argument():
    model = _model()
    ids = torch.randint(0, 31, (2, 6))
    with pytest.raises(ValueError, match="batches must be an iterable of batches.*got a tensor"):
        calibrate_kv_scales(model, ids)
    with pytest.raises(ValueError, match=r"batches\[1\] has token ids in \[31, 31\].*\[0, 31\)"):
        calibrate_kv_scales(model, [ids, torch.full((2, 6), 31)])
    with pytest.raises(ValueError, match=r"batches\[0\] has token ids in \[-1"):
        calibrate_kv_scales(model, [ids - 1])
    with pytest.raises(ValueError, match=r"batches\[0\] is all padding"):
        calibrate_kv_scales(model, [(ids, torch.zeros(2, 6, dtype=torch.bool))])
    with pytest.raises(ValueError, match=r"batches\[0\] mask must be bool or a 0/1 float mask"):
        calibrate_kv_scales(model, [(ids, torch.full((2, 6), 0.5))])
    with pytest.raises(ValueError, match=r"batches\[0\] mask must have the ids' shape"):
        calibrate_kv_scales(model, [(ids, torch.ones(2, 5, dtype=torch.bool))])


def test_float_01_masks_of_helpers_rl_equal_bool_masks():
    model = _model()
    ids = torch.randint(0, 31, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[2, 5:] = False  # after EOS
    a = calibrate_kv_scales(model, [(ids, mask)], granularity="head")
    b = calibrate_kv_scales(model, [(ids, mask.float())], granularity="head")
    assert a == b  # bit for bit


def test_kvcache_never_imports_models_and_fp8_never_imports_kvcache():
    """The arrows run models -> kvcache -> fp8 (no import circle, deferred imports included)."""
    import ast
    from pathlib import Path

    root = Path(helpers.__file__).parent

    def imported(pkg):
        out = set()
        for f in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    out.add(node.module)
                elif isinstance(node, ast.Import):
                    out |= {a.name for a in node.names}
        return out

    assert not [m for m in imported("kvcache") if m.startswith("helpers.models")]
    assert not [m for m in imported("fp8") if m.startswith(("helpers.kvcache", "helpers.models"))]
