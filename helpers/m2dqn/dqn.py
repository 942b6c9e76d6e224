"""DQN, Double DQN and M2DQN (max-mean loss), readable top to bottom (CleanRL style).

M2DQN (Zhang, Zou, Lai, Xu, arXiv 2209.07809): at each training step sample ``M`` independent minibatches of
``B`` transitions from replay, compute the mean TD loss of each, and minimise the *maximum* of the ``M`` means on
top of Double DQN. The idea comes from the max-mean regression of Xu & Xuan (2019):
``min_theta max_j (1/n_j) sum_l (g(x_jl) - y_jl)^2``. The paper's M, B, loss and code are not public; the
reconstruction used here is stated in ``notebooks/04_m2dqn.ipynb``.

Sections, in the order the algorithm runs:

1. arguments (:class:`Args`) and per-environment defaults (:data:`ENV_DEFAULTS`: rl-baselines3-zoo's tuned DQN)
2. replay buffer (:class:`ReplayBuffer`, a numpy ring buffer; ``M`` minibatches sampled in one call)
3. Q-network (:class:`QNetwork`, a small MLP)
4. losses: per-sample TD loss, :func:`max_mean_loss`, :func:`tilted_loss`
5. the update (:func:`td_update`), shared by every method
6. the training loop (:func:`train_dqn`) with periodic greedy evaluation on a separate env

:mod:`helpers.m2dqn.batched` computes the same updates for N seeds at once (the notebook trains with it); the
method, the controls and the sources are in ``docs/m2dqn.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, NamedTuple

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers.core.runtime import seed_everything
from helpers.core.timing import single_thread

__all__ = [
    "ALGOS",
    "LOSS_AGGS",
    "TD_LOSSES",
    "ENV_DEFAULTS",
    "Args",
    "Batch",
    "ReplayBuffer",
    "QNetwork",
    "DQNRun",
    "linear_schedule",
    "evaluate",
    "max_mean_loss",
    "tilted_loss",
    "aggregate_losses",
    "td_targets",
    "per_sample_td_loss",
    "td_update",
    "loss_metrics",
    "make_args",
    "train_dqn",
]

ALGOS = ("dqn", "ddqn", "m2dqn")
REPLAYS = ("uniform", "prioritized")
LOSS_AGGS = ("max", "tilted", "mean")
TD_LOSSES = ("huber", "mse")
# Offsets that keep the evaluation env's and the buffer's random streams apart from the training env's.
EVAL_SEED_OFFSET = 10_000
BUFFER_SEED_OFFSET = 20_000


# ---------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """Gymnasium environment id (discrete actions, flat Box observations)"""
    algo: str = "ddqn"
    """'dqn' (max target), 'ddqn' (Double DQN target) or 'm2dqn' (Double DQN target + loss over M minibatches)"""
    seed: int = 1
    """seed of random, numpy, torch, the envs and the replay sampler"""
    total_steps: int = 50_000
    """environment steps of training"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    buffer_size: int = 50_000
    """replay buffer capacity (transitions)"""
    gamma: float = 0.99
    """discount factor"""
    target_update_interval: int = 250
    """environment steps between hard copies of the online network into the target network"""
    batch_size: int = 64
    """B: transitions per minibatch"""
    num_batches: int = 1
    """M: minibatches sampled per gradient step (m2dqn only, default M2DQN_DEFAULT_M there; dqn/ddqn use 1)"""
    grad_steps: int = 1
    """gradient steps per training call (the 'same compute' control uses M)"""
    loss_agg: str = "max"
    """m2dqn only: how the M minibatch losses are combined - 'max' (M2DQN), 'tilted' (ablation) or 'mean'"""
    tilt: float = 10.0
    """t of the tilted loss (1/t) log mean exp(t L_i); 0 -> mean, inf -> max"""
    replay: str = "uniform"
    """'uniform' or 'prioritized' (proportional PER, Schaul et al. 2016; batched trainer only: helpers.m2dqn.per)"""
    per_alpha: float = 0.6
    """PER priority exponent: P(i) proportional to p_i^alpha"""
    per_beta: float = 0.4
    """PER importance-weight exponent at the start, annealed linearly to 1 over training"""
    td_loss: str = "huber"
    """per-sample TD loss: 'huber' (smooth L1, delta 1) or 'mse'"""
    start_e: float = 1.0
    """initial epsilon of the linear epsilon-greedy schedule"""
    end_e: float = 0.05
    """final epsilon"""
    exploration_fraction: float = 0.2
    """fraction of total_steps over which epsilon decays linearly from start_e to end_e"""
    learning_starts: int = 1_000
    """environment steps of random play before the first update"""
    train_frequency: int = 4
    """environment steps between training calls"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer widths of the Q-network MLP"""
    max_grad_norm: float = 0.0
    """gradient-norm clip; <= 0 disables (CleanRL: none; the Huber loss already bounds per-sample gradients)"""
    eval_interval: int = 5_000
    """environment steps between greedy evaluations (also evaluated at the end)"""
    eval_episodes: int = 10
    """episodes per greedy evaluation"""
    log_interval: int = 500
    """environment steps between loss records"""
    progress: bool = False
    """show a tqdm progress bar"""


# Per-environment settings: rl-baselines3-zoo's tuned DQN, `hyperparams/dqn.yml` (docs/m2dqn.md gives the commit and
# every source), used exactly: net, steps, learning rate, batch, buffer, learning_starts, gamma, target update period
# (env steps), train_freq (env steps between training calls) and gradient_steps (zoo -1 = as many gradient steps as
# env steps collected, so train_frequency), exploration. Stable-Baselines3's DQN also clips the gradient norm at 10 and
# uses the Huber loss, kept here. Only CartPole-v1 fits the full profile on 2 shared CPU cores (its 25k updates of a
# 256x256 MLP per run); the others take 60k-100k updates of batch 128 per run (notebook 04 gives the measured cost).
ZOO_MAX_GRAD_NORM = 10.0  # Stable-Baselines3 DQN's default max_grad_norm (the zoo does not override it)
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(total_steps=50_000, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                        learning_starts=1_000, gamma=0.99, target_update_interval=10, train_frequency=256,
                        grad_steps=128, exploration_fraction=0.16, end_e=0.04, hidden=(256, 256),
                        max_grad_norm=ZOO_MAX_GRAD_NORM),
    "Acrobot-v1": dict(total_steps=100_000, learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
                       learning_starts=0, gamma=0.99, target_update_interval=250, train_frequency=4, grad_steps=4,
                       exploration_fraction=0.12, end_e=0.1, hidden=(256, 256), max_grad_norm=ZOO_MAX_GRAD_NORM),
    # the zoo tunes LunarLander-v2; gymnasium 1.x ships v3 (same dynamics, bug fixes), given the same settings
    "LunarLander-v3": dict(total_steps=100_000, learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
                           learning_starts=0, gamma=0.99, target_update_interval=250, train_frequency=4,
                           grad_steps=4, exploration_fraction=0.12, end_e=0.1, hidden=(256, 256),
                           max_grad_norm=ZOO_MAX_GRAD_NORM),
    "MountainCar-v0": dict(total_steps=120_000, learning_rate=4e-3, batch_size=128, buffer_size=10_000,
                           learning_starts=1_000, gamma=0.98, target_update_interval=600, train_frequency=16,
                           grad_steps=8, exploration_fraction=0.2, end_e=0.07, hidden=(256, 256),
                           max_grad_norm=ZOO_MAX_GRAD_NORM),
}


def _check_args(a: Args) -> None:
    """Raise ValueError naming the first bad argument."""
    if a.env_id not in gym.registry:
        raise ValueError(f"env_id must be a registered Gymnasium id (e.g. 'CartPole-v1'), got {a.env_id!r}")
    choices = {"algo": ALGOS, "loss_agg": LOSS_AGGS, "td_loss": TD_LOSSES, "replay": REPLAYS}
    for name, allowed in choices.items():
        if getattr(a, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(a, name)!r}")
    positive = ("total_steps", "buffer_size", "batch_size", "num_batches", "grad_steps", "target_update_interval",
                "train_frequency", "eval_interval", "eval_episodes", "log_interval")
    for name in positive:
        v = getattr(a, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if a.algo != "m2dqn" and a.num_batches != 1:
        raise ValueError(f"num_batches must be 1 for algo={a.algo!r} (got {a.num_batches}); "
                         "use algo='m2dqn', or batch_size=M*B for the same-samples control")
    if not (0.0 < a.learning_rate < 1.0):
        raise ValueError(f"learning_rate must be in (0, 1), got {a.learning_rate!r}")
    if not (0.0 <= a.gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {a.gamma!r}")
    if not (0.0 <= a.end_e <= a.start_e <= 1.0):
        raise ValueError(f"need 0 <= end_e <= start_e <= 1, got start_e={a.start_e!r}, end_e={a.end_e!r}")
    if not (0.0 < a.exploration_fraction <= 1.0):
        raise ValueError(f"exploration_fraction must be in (0, 1], got {a.exploration_fraction!r}")
    if not (isinstance(a.learning_starts, (int, np.integer)) and a.learning_starts >= 0):
        raise ValueError(f"learning_starts must be an int >= 0, got {a.learning_starts!r}")
    if not (0.0 <= a.per_alpha and 0.0 <= a.per_beta <= 1.0):
        raise ValueError(f"need per_alpha >= 0 and 0 <= per_beta <= 1, got {a.per_alpha!r}, {a.per_beta!r}")
    if a.replay == "prioritized" and a.num_batches != 1:
        raise ValueError(f"replay='prioritized' is the PER control of DDQN: num_batches must be 1, got {a.num_batches}")
    if not (a.tilt >= 0.0):
        raise ValueError(f"tilt must be >= 0 (0 -> mean, inf -> max), got {a.tilt!r}")
    if len(a.hidden) < 1 or any(int(h) < 1 for h in a.hidden):
        raise ValueError(f"hidden must be a non-empty sequence of widths >= 1, got {a.hidden!r}")


# M2DQN with M = 1 is plain Double DQN; the paper does not publish its M, so algo="m2dqn" without an explicit
# num_batches uses this value (the notebook's default too) rather than silently degenerating to DDQN.
M2DQN_DEFAULT_M = 4


def make_args(env_id: str = "CartPole-v1", **overrides: Any) -> Args:
    """:class:`Args` for ``env_id``: dataclass defaults, then :data:`ENV_DEFAULTS`, then ``overrides``
    (``algo="m2dqn"`` without ``num_batches`` gets :data:`M2DQN_DEFAULT_M`)."""
    names = {f.name for f in fields(Args)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; expected names of helpers.m2dqn.dqn.Args")
    kw = {**ENV_DEFAULTS.get(env_id, {}), **overrides, "env_id": env_id}
    if kw.get("algo") == "m2dqn":
        kw.setdefault("num_batches", M2DQN_DEFAULT_M)
    if "hidden" in kw:
        kw["hidden"] = tuple(kw["hidden"])
    args = Args(**kw)
    _check_args(args)
    return args


# ---------------------------------------------------------------------------------------------------------------
# 2. Replay buffer
# ---------------------------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """Transitions with leading shape ``[M, B]`` (M minibatches of B)."""

    obs: np.ndarray  # [M, B, obs_dim] float32
    actions: np.ndarray  # [M, B] int64
    rewards: np.ndarray  # [M, B] float32
    next_obs: np.ndarray  # [M, B, obs_dim] float32
    dones: np.ndarray  # [M, B] float32, 1.0 where the episode *terminated* (no bootstrap); truncation is 0.0
    indices: np.ndarray  # [M, B] int64, rows of the buffer


class ReplayBuffer:
    """A fixed-capacity numpy ring buffer of transitions; the oldest is overwritten once full.

    Args:
        capacity: number of transitions kept.
        obs_dim: length of a flat observation.
        seed: seeds the buffer's own sampler (``numpy.random.Generator``), independent of global state.
    """

    def __init__(self, capacity: int, obs_dim: int, *, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        if obs_dim < 1:
            raise ValueError(f"obs_dim must be >= 1, got {obs_dim!r}")
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.pos = 0  # next row to write
        self.size = 0  # rows holding data
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        """Store one transition at the write position and advance it (wrapping at ``capacity``)."""
        i = self.pos
        self.obs[i] = obs
        self.next_obs[i] = next_obs
        self.actions[i] = action
        self.rewards[i] = reward
        self.dones[i] = float(terminated)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, num_batches: int = 1) -> Batch:
        """``num_batches`` independent minibatches of ``batch_size``, uniform with replacement, in one call."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches!r}")
        idx = self.rng.integers(0, self.size, size=(num_batches, batch_size))  # [M, B]
        return Batch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.dones[idx], idx)


# ---------------------------------------------------------------------------------------------------------------
# 3. Q-network
# ---------------------------------------------------------------------------------------------------------------
class QNetwork(nn.Module):
    """MLP ``[N, obs_dim] float32 -> [N, n_actions]`` action values, ReLU between layers."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Iterable[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def numpy_policy(self):
        """A greedy policy ``obs [obs_dim] -> int`` that runs the MLP in numpy on views of the live weights.

        For one observation, torch's per-call overhead is ~10x the arithmetic; the numpy views share memory with
        the parameters (updated in place by the optimizer), so the policy always acts with the current weights.
        """
        layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in self.net if isinstance(m, nn.Linear)]

        def act(obs: np.ndarray) -> int:
            h = np.asarray(obs, dtype=np.float32)
            for w, b in layers[:-1]:
                h = np.maximum(w @ h + b, 0.0)
            w, b = layers[-1]
            return int(np.argmax(w @ h + b))

        return act


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    """Epsilon at step ``t``: linear from ``start_e`` to ``end_e`` over ``duration`` steps, then flat."""
    return max(end_e, start_e + (end_e - start_e) * t / max(duration, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# 4. Losses
# ---------------------------------------------------------------------------------------------------------------
def max_mean_loss(batch_losses: torch.Tensor) -> torch.Tensor:
    """The M2DQN loss: ``max_i L_i`` over ``batch_losses`` ``[M]`` (each the mean TD loss of one minibatch).

    Indexing at the argmax (rather than ``torch.max``, whose backward splits the gradient over ties) makes the
    gradient flow through the maximising batch only - the first one on ties.
    """
    if batch_losses.ndim != 1 or batch_losses.numel() < 1:
        raise ValueError(f"batch_losses must have shape [M] with M >= 1, got {tuple(batch_losses.shape)}")
    return batch_losses[torch.argmax(batch_losses.detach())]


def tilted_loss(batch_losses: torch.Tensor, t: float) -> torch.Tensor:
    """The tilted (log-mean-exp) loss ``(1/t) log((1/M) sum_i exp(t L_i))`` over ``batch_losses`` ``[M]``.

    Tends to the mean as ``t -> 0`` (returned exactly at ``t == 0``) and to the max as ``t -> inf`` (``t == inf``
    returns :func:`max_mean_loss`). Computed with ``logsumexp`` so large ``t * L`` does not overflow. Its gradient
    weighs batch ``i`` by ``softmax(t L)_i``.
    """
    if batch_losses.ndim != 1 or batch_losses.numel() < 1:
        raise ValueError(f"batch_losses must have shape [M] with M >= 1, got {tuple(batch_losses.shape)}")
    t = float(t)
    if not t >= 0.0:
        raise ValueError(f"t must be >= 0, got {t!r}")
    if t == 0.0:
        return batch_losses.mean()
    if math.isinf(t):
        return max_mean_loss(batch_losses)
    m = batch_losses.numel()
    return (torch.logsumexp(t * batch_losses, dim=0) - math.log(m)) / t


def aggregate_losses(batch_losses: torch.Tensor, how: str = "max", tilt: float = 10.0) -> torch.Tensor:
    """Combine ``[M]`` minibatch losses: ``'max'`` (M2DQN), ``'tilted'`` (ablation) or ``'mean'``."""
    if how == "max":
        return max_mean_loss(batch_losses)
    if how == "tilted":
        return tilted_loss(batch_losses, tilt)
    if how == "mean":
        return batch_losses.mean()
    raise ValueError(f"how must be one of {LOSS_AGGS}, got {how!r}")


@torch.no_grad()
def td_targets(target_net: nn.Module, rewards: torch.Tensor, next_obs: torch.Tensor, dones: torch.Tensor,
               gamma: float, online_next_q: torch.Tensor | None = None) -> torch.Tensor:
    """``y = r + gamma (1 - done) Q_target(s', a*)`` for ``[N]`` transitions.

    ``a* = argmax_a online_next_q`` (Double DQN; ``online_next_q`` is ``Q_online(s')`` ``[N, A]``) when given,
    else ``argmax_a Q_target(s', a)`` (DQN).
    """
    q_next = target_net(next_obs)  # [N, A]
    if online_next_q is None:
        v_next = q_next.max(dim=1).values
    else:
        a_star = online_next_q.argmax(dim=1, keepdim=True)  # [N, 1]
        v_next = q_next.gather(1, a_star).squeeze(1)
    return rewards + gamma * (1.0 - dones) * v_next


def per_sample_td_loss(q_sa: torch.Tensor, y: torch.Tensor, kind: str = "huber") -> torch.Tensor:
    """Elementwise TD loss ``[N]``: Huber (delta 1, as DQN's gradient clipping) or squared error."""
    if kind == "huber":
        return F.smooth_l1_loss(q_sa, y, reduction="none")
    if kind == "mse":
        return F.mse_loss(q_sa, y, reduction="none")
    raise ValueError(f"kind must be one of {TD_LOSSES}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# 5. The update
# ---------------------------------------------------------------------------------------------------------------
def td_update(q_net: nn.Module, target_net: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
              args: Args) -> dict[str, torch.Tensor]:
    """One gradient step on ``batch`` (leading shape ``[M, B]``); returns detached tensors: ``losses/td_loss`` (0-d),
    ``batch_losses`` ``[M]`` and ``q_sa`` ``[M*B]`` (see :func:`loss_metrics`).

    * dqn / ddqn: ``M == 1``, the loss is the mean over the B transitions.
    * m2dqn: the M minibatches go through the network in one ``[M*B]`` forward pass; the per-sample losses are
      averaged per minibatch (``[M]``) and combined by ``args.loss_agg``.
    """
    m, b = batch.actions.shape
    obs = torch.from_numpy(batch.obs.reshape(m * b, -1))  # [M*B, obs_dim]
    next_obs = torch.from_numpy(batch.next_obs.reshape(m * b, -1))
    actions = torch.from_numpy(batch.actions.reshape(m * b))
    rewards = torch.from_numpy(batch.rewards.reshape(m * b))
    dones = torch.from_numpy(batch.dones.reshape(m * b))

    n = m * b
    if args.algo == "dqn":
        q_all, online_next_q = q_net(obs), None  # [N, A]
    else:  # one forward for Q(s) and for Double DQN's argmax at s' (fewer ops: per-op overhead dominates here)
        q_both = q_net(torch.cat([obs, next_obs]))  # [2N, A]
        q_all, online_next_q = q_both[:n], q_both[n:].detach()
    y = td_targets(target_net, rewards, next_obs, dones, args.gamma, online_next_q)  # [N], no gradient
    q_sa = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)  # [N]
    batch_losses = per_sample_td_loss(q_sa, y, args.td_loss).view(m, b).mean(dim=1)  # [M]
    loss = aggregate_losses(batch_losses, args.loss_agg, args.tilt) if args.algo == "m2dqn" else batch_losses[0]

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(q_net.parameters(), args.max_grad_norm, foreach=True)
    optimizer.step()

    # Detached tensors, reduced only when logged (loss_metrics): reductions and .item() on every update cost more
    # than they tell.
    return {"losses/td_loss": loss.detach(), "batch_losses": batch_losses.detach(), "q_sa": q_sa.detach()}


def loss_metrics(update_out: dict[str, torch.Tensor]) -> dict[str, float]:
    """Plain-float metrics from :func:`td_update`'s output: ``losses/td_loss`` (the optimised loss),
    ``losses/mean_batch_loss`` and ``losses/max_batch_loss`` (over the M minibatches), ``losses/q_values``."""
    bl = update_out["batch_losses"]
    return {
        "losses/td_loss": float(update_out["losses/td_loss"]),
        "losses/mean_batch_loss": float(bl.mean()),
        "losses/max_batch_loss": float(bl.max()),
        "losses/q_values": float(update_out["q_sa"].mean()),
    }


# ---------------------------------------------------------------------------------------------------------------
# 6. Training loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DQNRun:
    """What :func:`train_dqn` returns.

    * ``episodes``: one row per finished training episode (with exploration): ``step`` (env step at its end),
      ``episode``, ``charts/episodic_return``, ``charts/episodic_length``, ``charts/epsilon``.
    * ``evals``: one row per greedy evaluation: ``step``, ``eval/return_mean``, ``eval/return_std``,
      ``eval/returns`` (list of the episode returns).
    * ``losses``: every ``log_interval`` steps after learning starts: ``step`` and the ``losses/*`` of the last update.
    * ``metrics``: scalars - ``charts/SPS`` (env steps per second over the whole run, evaluation excluded),
      ``time/update_ms`` (mean wall time of one training call: ``grad_steps`` gradient steps), ``time/train_s``,
      ``time/eval_s``, ``eval/final_return``, ``train/calls`` and ``train/grad_steps``.
    * ``config``: the :class:`Args` as a dict.
    """

    episodes: pd.DataFrame
    evals: pd.DataFrame
    losses: pd.DataFrame
    metrics: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)


def evaluate(policy: Callable[[np.ndarray], int], env: gym.Env, episodes: int, seed: int) -> list[float]:
    """Returns of ``episodes`` episodes of ``policy`` (greedy: epsilon 0) on ``env``, reset with seeds
    ``seed, seed+1, ...``."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done, total = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(policy(obs))
            total += float(r)
            done = term or trunc
        returns.append(total)
    return returns


def train_dqn(env_id: str = "CartPole-v1", **kwargs: Any) -> DQNRun:
    """Train DQN / Double DQN / M2DQN on ``env_id``; see :class:`Args` for every keyword and its default.

    ``kwargs`` override :data:`ENV_DEFAULTS` for the env, which override :class:`Args`. Common ones: ``algo``,
    ``num_batches`` (M), ``batch_size`` (B), ``total_steps``, ``seed``, ``loss_agg``, ``tilt``, ``grad_steps``.
    Raises ValueError naming the argument on bad input (unknown env id or algo, M < 1, B < 1, ...).
    """
    args = make_args(env_id, **kwargs)
    if args.replay != "uniform":
        raise ValueError(f"replay={args.replay!r} needs the batched trainer (helpers.m2dqn.batched.train_batched); "
                         "train_dqn samples uniformly")
    # One intra-op thread: for an MLP this small, extra threads only add synchronisation (and on a shared machine
    # spin-waiting OpenMP threads slow everything down by an order of magnitude). Restored on exit.
    with single_thread():
        return _train(args)


def _train(args: Args) -> DQNRun:
    """The loop of :func:`train_dqn` on checked arguments."""
    # -- seeding: random, numpy, torch, the env and its action space; the eval env and buffer get their own streams
    env = gym.make(args.env_id)
    eval_env = gym.make(args.env_id)
    if not isinstance(env.action_space, gym.spaces.Discrete) or len(env.observation_space.shape or ()) != 1:
        raise ValueError(f"env_id must have a Discrete action space and flat observations, got {args.env_id!r}")
    # deterministic=False: torch.use_deterministic_algorithms imports torch._inductor (seconds per process), and
    # the CPU kernels this MLP uses are deterministic already (the seeding test checks same seed -> same returns).
    seed_everything(args.seed, env, deterministic=False)
    obs, _ = env.reset(seed=args.seed)
    obs_dim, n_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    explore_rng = np.random.default_rng(args.seed)

    # -- networks, optimizer, buffer
    q_net = QNetwork(obs_dim, n_actions, args.hidden)
    greedy = q_net.numpy_policy()
    target_net = QNetwork(obs_dim, n_actions, args.hidden)
    target_net.load_state_dict(q_net.state_dict())
    # fused: one kernel for all parameters; the per-parameter loop costs ~2x the forward+backward of this MLP.
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, fused=True)
    rb = ReplayBuffer(args.buffer_size, obs_dim, seed=args.seed + BUFFER_SEED_OFFSET)

    episodes: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    losses: list[dict[str, float]] = []
    ep_return, ep_len, n_updates, update_s, eval_s = 0.0, 0, 0, 0.0, 0.0
    eps_duration = args.exploration_fraction * args.total_steps
    last: dict[str, torch.Tensor] = {}

    def run_eval(step: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        rets = evaluate(greedy, eval_env, args.eval_episodes, args.seed + EVAL_SEED_OFFSET)
        evals.append({"step": step, "eval/return_mean": float(np.mean(rets)),
                      "eval/return_std": float(np.std(rets)), "eval/returns": rets})
        eval_s += time.perf_counter() - t

    t0 = time.perf_counter()
    for global_step in tqdm(range(1, args.total_steps + 1), disable=not args.progress, mininterval=1.0,
                            desc=f"{args.algo} {args.env_id} s{args.seed}"):
        # -- act: epsilon-greedy
        epsilon = linear_schedule(args.start_e, args.end_e, eps_duration, global_step - 1)
        if explore_rng.random() < epsilon:
            action = int(env.action_space.sample())
        else:
            action = greedy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)

        # -- store: bootstrap through truncation (time limit), not through termination
        rb.add(obs, action, float(reward), next_obs, terminated)
        ep_return += float(reward)
        ep_len += 1
        obs = next_obs
        if terminated or truncated:
            episodes.append({"step": global_step, "episode": len(episodes), "charts/episodic_return": ep_return,
                             "charts/episodic_length": ep_len, "charts/epsilon": epsilon})
            obs, _ = env.reset()
            ep_return, ep_len = 0.0, 0

        # -- learn: grad_steps updates, each on M minibatches of B
        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                t = time.perf_counter()
                for _ in range(args.grad_steps):
                    batch = rb.sample(args.batch_size, args.num_batches)
                    last = td_update(q_net, target_net, optimizer, batch, args)
                update_s += time.perf_counter() - t
                n_updates += 1
            if global_step % args.target_update_interval == 0:
                target_net.load_state_dict(q_net.state_dict())
            if global_step % args.log_interval == 0 and last:
                losses.append({"step": global_step, **loss_metrics(last)})

        if global_step % args.eval_interval == 0 and global_step != args.total_steps:
            run_eval(global_step)
    run_eval(args.total_steps)
    wall = time.perf_counter() - t0
    env.close()
    eval_env.close()

    train_s = wall - eval_s
    metrics = {
        "charts/SPS": args.total_steps / max(train_s, 1e-9),
        "time/train_s": train_s,
        "time/eval_s": eval_s,
        "time/update_ms": 1e3 * update_s / max(n_updates, 1),
        "train/calls": float(n_updates),
        "train/grad_steps": float(n_updates * args.grad_steps),
        "eval/final_return": evals[-1]["eval/return_mean"],
    }
    return DQNRun(
        episodes=pd.DataFrame(episodes, columns=["step", "episode", "charts/episodic_return",
                                                 "charts/episodic_length", "charts/epsilon"]),
        evals=pd.DataFrame(evals, columns=["step", "eval/return_mean", "eval/return_std", "eval/returns"]),
        losses=pd.DataFrame(losses),
        metrics=metrics,
        config=asdict(args),
    )
