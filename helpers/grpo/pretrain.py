"""Supervised pre-training of the decoder on the addition task, so that GRPO starts from a non-trivial success rate.

Teacher forcing on ``prompt + answer`` with the cross-entropy on answer tokens only; AdamW with a short warm-up.
Training stops early once the sampled (temperature 1) accuracy on a fixed evaluation set reaches ``target_acc``:
RL then has room to improve (a policy at 100% gives GRPO nothing to learn, every group's advantages are 0).

Regenerate notebook 05's checkpoint (``data/grpo_adder10.safetensors`` + ``.json``: the :class:`PretrainConfig`
defaults, about 10 minutes on two CPU cores; ``data/README.md`` gives the arguments of the other shipped ones)::

    .venv/bin/python -m helpers.grpo.pretrain --out data/grpo_adder10
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers.core.runtime import REPO_ROOT, seed_everything
from helpers.grpo import task
from helpers.models.decoder import Decoder, DecoderConfig

__all__ = ["PretrainConfig", "pretrain", "evaluate", "save_policy", "load_policy", "DEFAULT_CHECKPOINT"]

DEFAULT_CHECKPOINT = REPO_ROOT / "data" / "grpo_adder10"


@dataclass
class PretrainConfig:
    """Knobs of :func:`pretrain` (defaults: the shipped checkpoint)."""

    n_digits: int = 10
    """Digits per operand (answers are 2 n + 1 tokens)."""
    d_model: int = 128
    """Residual width."""
    n_layer: int = 2
    """Transformer blocks."""
    qk_norm: bool = True
    """Qwen3-style QK-norm (False: Llama / Qwen2.5)."""
    head_dim: int = 64
    """Channels per attention head (Qwen3-8B: 128); query heads = d_model / head_dim, KV heads half of those."""
    rope_theta: float = 1e6
    """RoPE base (Qwen3: 1e6)."""
    n_head: int = 0
    """Query heads (0: d_model / head_dim); KV heads are half of them (grouped-query attention)."""
    steps: int = 4000
    """Most optimizer steps."""
    batch: int = 128
    """Problems per step."""
    lr: float = 3e-3
    """AdamW peak learning rate (cosine decay after a 100-step warm-up)."""
    target_acc: float = 0.3
    """Stop once the temperature-1 sampled accuracy on the evaluation set reaches this."""
    eval_every: int = 25
    """Steps between evaluations."""
    seed: int = 1
    """Seeds init and data (seed 0 stalls on a plateau with one sum digit guessed; seed 1 does not)."""

    def decoder_config(self) -> DecoderConfig:
        n_head = self.n_head or max(self.d_model // self.head_dim, 1)
        return DecoderConfig(vocab_size=task.VOCAB_SIZE, n_layer=self.n_layer, n_head=n_head,
                             n_kv_head=max(n_head // 2, 1), head_dim=self.head_dim, d_model=self.d_model,
                             d_ff=2 * self.d_model, max_seq_len=4 * self.n_digits + 8, qk_norm=self.qk_norm,
                             rope_theta=self.rope_theta)


def _batch(n: int, n_digits: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    probs = task.sample_problems(n, n_digits, g)
    return task.encode_prompts(probs), task.encode_answers(probs)


@torch.no_grad()
def evaluate(model: Decoder, n_digits: int, *, n: int = 512, temperature: float = 1.0, seed: int = 12345) -> float:
    """Fraction of ``n`` fixed problems answered exactly when sampling at ``temperature`` (0 = greedy)."""
    g = torch.Generator().manual_seed(seed)
    prompts, answers = _batch(n, n_digits, g)
    out = model.generate(prompts, task.answer_len(n_digits), temperature=temperature, eos_id=task.EOS,
                         pad_id=task.PAD, generator=g)
    return float(task.rewards(out.tokens, answers).mean())


def pretrain(cfg: PretrainConfig, progress: bool = False) -> tuple[Decoder, list[dict[str, float]]]:
    """Train a fresh decoder on the task. Returns the model (fp32, eval mode) and the evaluation history
    (``pretrain/step``, ``pretrain/loss``, ``pretrain/acc_sampled``, ``pretrain/acc_greedy``)."""
    seed_everything(cfg.seed)
    model = Decoder(cfg.decoder_config())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))))
    g = torch.Generator().manual_seed(cfg.seed)
    p_len = task.prompt_len(cfg.n_digits)
    history: list[dict[str, float]] = []
    for step in range(1, cfg.steps + 1):
        prompts, answers = _batch(cfg.batch, cfg.n_digits, g)
        seq = torch.cat([prompts, answers], dim=1)  # [B, P + A]
        logits = model(seq[:, :-1])  # position t predicts token t + 1
        loss = F.cross_entropy(logits[:, p_len - 1:].reshape(-1, task.VOCAB_SIZE), answers.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            acc = evaluate(model, cfg.n_digits, n=256)
            model.train()
            history.append({"pretrain/step": step, "pretrain/loss": float(loss.detach()), "pretrain/acc_sampled": acc})
            if progress:
                print(history[-1], flush=True)
            if acc >= cfg.target_acc:
                break
    model.eval()
    history[-1]["pretrain/acc_greedy"] = evaluate(model, cfg.n_digits, n=256, temperature=0.0)
    return model, history


def save_policy(model: Decoder, path: str | Path, extra: dict | None = None) -> None:
    """Write ``<path>.safetensors`` (fp32 weights) and ``<path>.json`` (the DecoderConfig and ``extra``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"decoder": asdict(model.cfg), **(extra or {})}, indent=1))


def load_policy(path: str | Path = DEFAULT_CHECKPOINT) -> tuple[Decoder, dict]:
    """Load a checkpoint written by :func:`save_policy`: (fp32 Decoder in eval mode, the json metadata)."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    model = Decoder(DecoderConfig(**meta["decoder"]))
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))), strict=True)
    return model.eval(), meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_CHECKPOINT), help="path stem for .safetensors / .json")
    for field, value in asdict(PretrainConfig()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(value) if not isinstance(value, bool) else int,
                        default=value)
    args = vars(ap.parse_args())
    out = args.pop("out")
    cfg = PretrainConfig(**{k: (bool(v) if isinstance(getattr(PretrainConfig, k, None), bool) else v)
                            for k, v in args.items()})
    model, history = pretrain(cfg, progress=True)
    save_policy(model, out, {"pretrain": asdict(cfg), "history": history})
    print(f"wrote {out}.safetensors / .json: {history[-1]}")


if __name__ == "__main__":
    main()
