"""The rollout engine: its own copy of the policy, refreshed from the trainer after every update (as in veRL).

An engine configuration (:class:`EngineConfig`) fixes what the engine runs in:

* ``linear="bf16"``: every weight in bf16 (the BF16 rollout baseline);
* ``linear="fp8"``: the q/k/v/o and MLP projections as blockwise W8A8 :class:`~helpers.fp8.Fp8Linear` (embeddings,
  lm_head and norms stay bf16, :data:`helpers.fp8.linear.DEFAULT_SKIP`), with the GEMM path ``gemm``;
* ``kv_cache="fp8"``: the per-tensor FP8 KV cache of :mod:`helpers.kvcache` (:class:`~helpers.kvcache.Fp8KVCache`),
  its scales from :func:`~helpers.kvcache.calibrate_kv_scales` with ``kv_policy`` on the policy's schedule
  (``"nemo_rl"``: after every sync; ``"nemo_rl_once"`` / ``"vllm"``: at the first sync only, then stale;
  ``"unit"``: 1.0, never calibrated).

:meth:`RolloutEngine.sync` is the weight sync: it streams the trainer's fp32 tensors one at a time through
:func:`helpers.fp8.requantize_model_` (FP8 layers re-quantized in place, every other tensor ``copy_``-ed with a cast
to bf16), then recalibrates the KV scales on the trainer side, as NeMo-RL does (PR #1212): a no-grad forward of the
trainer's policy over a calibration batch - the last rollout's prompt + response tokens - with hooks on core
attention; the scales ride to the engine with the weights. :meth:`RolloutEngine.generate` samples with the preallocated KV cache and
returns the log-probs of the distribution it sampled from (the engine's own logits at the sampling temperature).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from helpers.fp8.format import DEFAULT_BLOCK, check_block_size, check_scale_fmt
from helpers.fp8.quant import quant_weight
from helpers.kvcache import Fp8KVCache, calibrate_kv_scales, get_policy
from helpers.fp8.linear import GEMM_PATHS, fp8_linears, quantize_model, requantize_model_
from helpers.models.decoder import Decoder, GenerationOutput

__all__ = ["EngineConfig", "RolloutEngine", "ENGINE_DTYPE", "WeightSyncAuditError"]

# The engine's high-precision dtype (what veRL's vLLM rollout runs in): bf16, also for the "BF16 rollout" arm.
ENGINE_DTYPE = torch.bfloat16
LINEARS = ("bf16", "fp8")
KV_CACHES = ("bf16", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    """What the rollout engine runs in (module docstring)."""

    linear: str = "bf16"
    """"bf16" or "fp8" (W8A8 blockwise linears)."""
    kv_cache: str = "bf16"
    """"bf16" or "fp8" (FP8 KV cache of helpers.kvcache)."""
    kv_policy: str = "nemo_rl"
    """Scale policy of helpers.kvcache (POLICIES): its schedule says when the scales are recalibrated."""
    scale_fmt: str = "fp32"
    """FP8 linear scale format: "fp32" or "ue8m0" (power-of-two)."""
    gemm: str = "bf16"
    """Fp8Linear GEMM path: "bf16" (dequantized bf16 GEMM, the CPU fast path) or "exact" (block-scaled GEMM)."""
    block_size: tuple[int, int] = DEFAULT_BLOCK
    """FP8 weight block (bn, bk); activations use 1 x bk groups. (128, 128) in every public FP8 checkpoint."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_size", check_block_size(self.block_size))
        if self.linear not in LINEARS:
            raise ValueError(f"linear must be one of {LINEARS}, got {self.linear!r}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.gemm not in GEMM_PATHS:
            raise ValueError(f"gemm must be one of {GEMM_PATHS}, got {self.gemm!r}")
        check_scale_fmt(self.scale_fmt)
        get_policy(self.kv_policy)  # ValueError naming the policy

    @property
    def label(self) -> str:
        """Short name: "bf16", "fp8" (W8A8) or "fp8+kv" (W8A8 + FP8 KV cache)."""
        if self.linear == "bf16":
            return "bf16" if self.kv_cache == "bf16" else "bf16+fp8kv"
        return "fp8" if self.kv_cache == "bf16" else "fp8+kv"


class WeightSyncAuditError(RuntimeError):
    """The engine's weights after a sync are not a fresh quantization of the trainer's (see
    :meth:`RolloutEngine.audit`): a broken sync, which must stop the run."""


class RolloutEngine:
    """A rollout engine holding its own copy of ``policy`` in the precision of ``cfg``.

    Args:
        policy: the trainer's decoder (fp32); copied, never referenced afterwards.
        cfg: the engine configuration.
        batch: rows per :meth:`generate` call (the KV cache is preallocated for it).
        max_len: prompt + response slots of the cache.
        calib_batch: the first calibration batch of the FP8 KV scales, long ``[n, T]`` ids or ``(ids, mask)``
            (later syncs calibrate on the batch passed to :meth:`sync`); required when ``cfg.kv_cache == "fp8"``.
    """

    def __init__(self, policy: Decoder, cfg: EngineConfig, *, batch: int, max_len: int,
                 calib_batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if not isinstance(policy, Decoder):
            raise ValueError(f"policy must be a Decoder, got {type(policy).__name__}")
        self.cfg = cfg
        model = copy.deepcopy(policy).to(ENGINE_DTYPE).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.linear == "fp8":
            quantize_model(model, block_size=cfg.block_size, scale_fmt=cfg.scale_fmt, backend="torch", gemm=cfg.gemm)
        self.model = model
        self.batch, self.max_len = batch, max_len
        self.n_calibrations = 0
        if cfg.kv_cache == "fp8":
            if calib_batch is None:
                raise ValueError("calib_batch must be given for an FP8 KV cache (its first scales come from it)")
            self.cache = Fp8KVCache.from_config(model.cfg, batch, max_len, dtype=ENGINE_DTYPE, backend="torch",
                                                device=model.device)
        else:
            self.cache = model.new_cache(batch, max_len)
        self.sync(policy, calib_batch)

    @torch.no_grad()
    def sync(self, policy: Decoder, calib_batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> dict[str, float]:
        """Weight sync from the trainer's ``policy``, then (FP8 KV cache, when the policy's schedule says so) the
        KV-scale recalibration on ``calib_batch`` with ``policy``.

        Returns ``engine/sync_s`` and ``engine/recalib_s`` (wall seconds), and the sync's counts
        (``engine/sync_layers``: FP8 layers re-quantized, ``engine/sync_bytes_written``)."""
        t0 = time.perf_counter()
        stream = ((k, v.detach()) for k, v in policy.state_dict().items())  # one tensor at a time
        m = requantize_model_(self.model, stream)
        t1 = time.perf_counter()
        schedule = get_policy(self.cfg.kv_policy).schedule
        due = schedule == "every_step" or (schedule == "once" and self.n_calibrations == 0)
        if self.cfg.kv_cache == "fp8" and due:
            if calib_batch is None:
                raise ValueError(f"calib_batch must be given: kv_policy {self.cfg.kv_policy!r} recalibrates now")
            self.cache.set_scales(calibrate_kv_scales(policy, [calib_batch], policy=self.cfg.kv_policy))
            self.n_calibrations += 1
        t2 = time.perf_counter()
        return {"engine/sync_s": t1 - t0, "engine/recalib_s": t2 - t1, "engine/sync_layers": float(m["layers"]),
                "engine/sync_bytes_written": float(m["bytes_written"])}

    @torch.no_grad()
    def audit(self, policy: Decoder) -> dict[str, float]:
        """The weight-sync audit (veRL PR #7986 checks the same after each sync): every FP8 layer's codes and
        ``weight_scale_inv`` must equal a fresh quantization of the trainer's weight (bit for bit, with the layer's
        block size and scale format), and every other engine tensor must equal the trainer's cast to the engine
        dtype. Raises :class:`WeightSyncAuditError` naming the first tensor that differs; returns
        ``engine/audit_tensors`` (tensors checked).

        All tensors are checked: on this model it costs about as much as the sync itself. A real engine would audit
        a sample of layers per step."""
        state = policy.state_dict()
        layers = fp8_linears(self.model)
        owned = set()
        for name, layer in layers.items():
            key = f"{name}.weight"
            owned |= {key, f"{name}.weight_scale_inv"}
            q, s = quant_weight(state[key], layer.weight_block_size, scale_fmt=layer.scale_fmt, backend="torch")
            if not torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)):
                raise WeightSyncAuditError(f"weight sync audit: FP8 codes of {key!r} differ from a fresh "
                                           f"quantization of the trainer's weight")
            if not torch.equal(layer.weight_scale_inv, s):
                raise WeightSyncAuditError(f"weight sync audit: {name}.weight_scale_inv differs from a fresh "
                                           f"quantization of the trainer's weight")
        n = 2 * len(layers)
        for key, value in self.model.state_dict().items():
            if key in owned:
                continue
            if key not in state or not torch.equal(value, state[key].to(value.dtype)):
                raise WeightSyncAuditError(f"weight sync audit: engine tensor {key!r} differs from the trainer's")
            n += 1
        return {"engine/audit_tensors": float(n)}

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float, eos_id: int,
                 pad_id: int, generator: torch.Generator) -> GenerationOutput:
        """Sample ``max_new_tokens`` after ``prompts`` long ``[batch, T0]`` with the engine's cache; the log-probs
        are those of the engine's sampling distribution ``softmax(logits / temperature)``."""
        if prompts.shape[0] != self.batch:
            raise ValueError(f"prompts must have {self.batch} rows (the cache's batch), got {prompts.shape[0]}")
        return self.model.generate(prompts, max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id,
                                   generator=generator, cache=self.cache)

    def fp8_layers(self) -> int:
        """Number of FP8 linear layers (0 for a bf16 engine)."""
        return len(fp8_linears(self.model))
