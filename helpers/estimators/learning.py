"""Policy-gradient training with mismatched rollouts: does rollout correction recover the matched learning curve?

The task ("fast lane") is a Markov chain over three tokens, small enough that a policy's expected reward is computed
exactly by a forward recursion, so learning curves carry no evaluation noise:

* token 0 "safe" earns ``r_safe`` (< 1), token 1 "fast" earns 1, token 2 "skid" earns 0;
* a skid right after a fast token is a crash: it and every later token earn 0;
* the sequence reward is the mean over its ``T`` tokens, so the best policy (always fast) earns 1 and
  always-safe earns ``r_safe``.

The trainer's policy is a table of logits ``theta`` [4, 3] (row 3 is BOS). The rollout engine samples from a copy
whose logits are rounded through FP8 e4m3 per ``fp8_block`` tile (:func:`helpers.estimators.markov.fp8_round`) and then
perturbed by a controlled amount: ``noise`` (Gaussian logit noise, redrawn at every weight sync) and ``epsilon``
(a uniform floor on the rollout probabilities, mu = (1 - eps) softmax + eps / V, as an engine whose sampler
adds probability mass to tokens the trainer has driven to ~0). A floor makes a fast run crash with probability
~eps / 3 per token under the rollout policy, so fast is worth less *under the rollout policy* than under the
trainer's policy: an uncorrected learner optimises the wrong policy, and only a correction that accounts for the
rest of the sequence (the crash comes later than the decision) can undo it - the token-level bias the theory
predicts.

Each step samples ``batch`` sequences from the rollout copy, computes group-normalised advantages (GRPO), and takes
one Adam step on :func:`helpers.rl.rollout_correction.policy_loss` with the method's weights or rejection mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.core.timing import single_thread
from helpers.estimators import markov as mt
from helpers.rl import rollout_correction as rc

__all__ = ["FastLaneConfig", "METHODS", "rollout_table", "exact_return", "sample_rewards", "train",
           "train_many", "summarize"]

N_TOKENS = 3  # safe, fast, skid
SAFE, FAST, SKID = 0, 1, 2
# Methods: (is level, threshold) for TIS; (mis level, upper) for rejection; the matched run samples from the trainer.
METHODS = {
    "matched": {"rollout": "train"},
    "uncorrected": {},
    "token_tis": {"is": ("token", 2.0)},
    "token_mis": {"mis": ("token", 2.0)},
    "seq_is": {"is": ("sequence", math.inf)},
    "seq_tis": {"is": ("sequence", 2.0)},
    "seq_mis": {"mis": ("sequence", 2.0)},
    # geometric ratios are per-token averages and sit near 1, so their band is narrow (veRL's preset: 0.999-1.001;
    # [1/1.1, 1.1] keeps most sequences here, where the per-token mismatch is large)
    "geo_mis": {"mis": ("geometric", 1.1)},
}


@dataclass
class FastLaneConfig:
    """Settings of one training run."""

    T: int = 16  # tokens per sequence
    r_safe: float = 0.7  # reward of a safe token (fast earns 1)
    steps: int = 150  # policy-gradient steps
    batch: int = 64  # sequences per step (one GRPO group)
    lr: float = 0.1  # Adam learning rate on the logits
    clip: float = 0.2  # PPO clip (inactive with one update per batch, kept for the loss's form)
    epsilon: float = 0.1  # rollout probability floor (controlled perturbation)
    noise: float = 0.0  # rollout Gaussian logit noise, redrawn every step (controlled perturbation)
    fp8_block: tuple[int, int] | None = (16, 16)  # FP8 rounding of the rollout copy's logits; None: no FP8
    eval_every: int = 5  # exact returns every this many steps (the recursion costs more than a step)
    seed: int = 0


def rollout_table(theta: torch.Tensor, cfg: FastLaneConfig, gen: torch.Generator) -> torch.Tensor:
    """The rollout engine's log-probs [4, 3]: FP8-rounded logits, Gaussian noise, then the epsilon floor."""
    if cfg.fp8_block is None:
        logits = theta.clone()
    else:
        logits = mt.fp8_round(theta, cfg.fp8_block)
    if cfg.noise > 0:
        logits = logits + cfg.noise * torch.randn(logits.shape, generator=gen)
    p = torch.softmax(logits, -1)
    return torch.log((1 - cfg.epsilon) * p + cfg.epsilon / N_TOKENS)


def exact_return(logp_table: torch.Tensor, T: int, r_safe: float) -> float:
    """E[R] under the chain ``logp_table`` [4, 3] by a forward recursion over (previous token, not crashed)."""
    P = logp_table.exp()
    r = torch.tensor([r_safe, 1.0, 0.0])
    alive = torch.ones(N_TOKENS + 1, N_TOKENS)
    alive[FAST, SKID] = 0.0  # skid after fast: crash
    a = torch.zeros(N_TOKENS + 1)
    a[N_TOKENS] = 1.0  # start in BOS, not crashed
    total = 0.0
    for _ in range(T):
        nxt = (a[:, None] * P * alive).sum(0)  # a_t[v] = sum_u a_{t-1}[u] P(v|u) alive(u, v)
        total += float(nxt @ r)
        a = torch.cat([nxt, torch.zeros(1)])
    return total / T


def sample_rewards(x: torch.Tensor, r_safe: float) -> torch.Tensor:
    """Sequence rewards [n] for sampled tokens ``x`` [n, T + 1] (column 0 is BOS)."""
    prev, cur = x[:, :-1], x[:, 1:]
    crash = (prev == FAST) & (cur == SKID)
    alive = (torch.cumsum(crash.long(), -1) == 0).float()  # 0 from the crash on
    r = torch.tensor([r_safe, 1.0, 0.0])[cur]
    return (r * alive).mean(-1)


def train(method: str, cfg: FastLaneConfig, *, progress: bool = False) -> dict[str, np.ndarray]:
    """Train one policy with ``method`` (a key of :data:`METHODS`). Returns arrays: every ``eval_every`` steps (and
    at the last, at steps ``eval_step``) ``return_train`` (exact E[R] of the trainer's policy) and ``return_rollout``
    (exact E[R] of the rollout copy); at every step the mismatch metrics
    of each batch (``kl``, ``k3_kl``, ``chi2_token``, ``ess`` of the C=2 token weights, ...), ``cost`` (fraction of
    tokens truncated by TIS or rejected by MIS) and ``ess_method`` (ESS of the weights the method actually used)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    with single_thread():
        return _train(METHODS[method], cfg, progress)


def _train(spec: dict, cfg: FastLaneConfig, progress: bool) -> dict[str, np.ndarray]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    theta = torch.zeros(N_TOKENS + 1, N_TOKENS, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    logs: dict[str, list[float]] = {}

    def log(**kw: float) -> None:
        for k, v in kw.items():
            logs.setdefault(k, []).append(float(v))

    for step in tqdm(range(cfg.steps), disable=not progress, leave=False):
        with torch.no_grad():
            lp_train_tab = mt.log_policy(theta)
            lp_roll_tab = lp_train_tab.clone() if spec.get("rollout") == "train" else rollout_table(theta, cfg, gen)
            if step % cfg.eval_every == 0 or step == cfg.steps - 1:
                log(eval_step=step, return_train=exact_return(lp_train_tab, cfg.T, cfg.r_safe),
                    return_rollout=exact_return(lp_roll_tab, cfg.T, cfg.r_safe))
            x = mt.sample_sequences(lp_roll_tab, cfg.batch, cfg.T, gen)
            prev, cur = x[:, :-1], x[:, 1:]
            lp_old, lp_roll = lp_train_tab[prev, cur], lp_roll_tab[prev, cur]  # [batch, T]
            mask = torch.ones_like(lp_old)
            R = sample_rewards(x, cfg.r_safe)
            adv = (R - R.mean()) / (R.std() + 1e-6)  # GRPO group-normalised advantage, one per sequence
            mm = rc.mismatch_metrics(lp_old, lp_roll, mask)
            weights, loss_mask, cost = None, mask, 0.0
            if "is" in spec:
                level, c = spec["is"]
                weights = rc.is_weights(lp_old, lp_roll, mask, level=level, threshold=c)
                seq_or_tok = rc.level_log_ratio(rc.log_ratio(lp_old, lp_roll, mask), mask, level)
                cost = float((seq_or_tok > math.log(c)).float().mean())  # fraction of tokens truncated
            if "mis" in spec:
                level, u = spec["mis"]
                loss_mask = rc.rejection_mask(lp_old, lp_roll, mask, level=level, upper=u)
                cost = rc.rejection_metrics(mask, loss_mask)["rejected_fraction_token"]
            w_eff = loss_mask if weights is None else weights * loss_mask  # the method's effective token weights
            ess_method = float(w_eff.mean() ** 2 / (w_eff * w_eff).mean().clamp(min=1e-30))  # (mean w)^2 / mean w^2
            log(**{k: mm[k] for k in ("kl", "k3_kl", "chi2_token", "ess", "fraction_truncated")}, cost=cost,
                ess_method=ess_method, reward_batch=float(R.mean()))
        logp = mt.log_policy(theta)[prev, cur]
        loss = rc.policy_loss(logp, lp_old, adv, loss_mask, rollout_weights=weights, clip=cfg.clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: np.asarray(v) for k, v in logs.items()}


def train_many(methods: list[str], seeds: list[int], cfg: FastLaneConfig, *, progress: bool = True
               ) -> dict[str, dict[str, np.ndarray]]:
    """Run every method for every seed. Returns {method: {metric: [n_seeds, steps] array}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    jobs = [(m, s) for m in methods for s in seeds]
    runs: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in methods}
    for m, s in tqdm(jobs, disable=not progress, desc="runs"):
        runs[m].append(train(m, FastLaneConfig(**{**cfg.__dict__, "seed": s})))
    for m in methods:
        out[m] = {k: np.stack([r[k] for r in runs[m]]) for k in runs[m][0]}
    return out


def summarize(runs: dict[str, dict[str, np.ndarray]], *, last: int = 5, matched: str = "matched",
              uncorrected: str = "uncorrected") -> "pd.DataFrame":
    """One row per method: final exact return of the trainer's policy (mean over seeds of the mean of the ``last``
    evaluations) with its seed std, the mean return over training (area under the curve), the gap to the matched
    run closed (``(final - final_uncorrected) / (final_matched - final_uncorrected)``; NaN when the uncorrected
    run has no gap), the cost (mean fraction of tokens truncated or rejected), the mean ESS of the method's own token weights, and the
    mean rollout KL its batches saw."""
    import pandas as pd

    final = {m: d["return_train"][:, -last:].mean(1) for m, d in runs.items()}  # [n_seeds] per method
    gap = float(final[matched].mean() - final[uncorrected].mean()) if matched in final and uncorrected in final \
        else float("nan")
    rows = []
    for m, d in runs.items():
        f = final[m]
        rows.append({
            "method": m,
            "final_return": float(f.mean()),
            "final_return_std": float(f.std()),
            "auc_return": float(d["return_train"].mean()),
            "final_rollout_return": float(d["return_rollout"][:, -last:].mean()),
            "gap_closed": float((f.mean() - final[uncorrected].mean()) / gap) if gap > 1e-3 else float("nan"),
            "cost_fraction": float(d["cost"].mean()),
            "ess": float(d["ess_method"].mean()),
            "kl": float(d["kl"].mean()),
        })
    return pd.DataFrame(rows)
