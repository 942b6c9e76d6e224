"""helpers.m2dqn.batched against the single-run reference, the controls' sample / update counts, and PER."""

import numpy as np
import pytest
import torch

from helpers.m2dqn import batched, dqn, grid, per

# Short CartPole runs with a small net and a few gradient steps per call; the zoo's gradient clip (10) stays on.
SHORT = dict(total_steps=1200, learning_starts=300, eval_interval=400, eval_episodes=2, log_interval=100,
             train_frequency=64, grad_steps=8, hidden=(32, 32))
# bmm and addmm sum the same products in different orders: per-step differences are ~1e-7 relative, and after a
# few hundred Adam steps the logged losses agree to ~1e-6; 1e-4 leaves room without hiding a wrong update.
RTOL = 1e-4


@pytest.mark.parametrize("algo_kw", [dict(algo="ddqn"), dict(algo="dqn"), dict(algo="m2dqn", num_batches=3),
                                     dict(algo="m2dqn", num_batches=2, loss_agg="tilted", tilt=5.0),
                                     dict(algo="m2dqn", num_batches=2, loss_agg="mean")],
                         ids=["ddqn", "dqn", "m2dqn-max", "m2dqn-tilted", "m2dqn-mean"])
def test_batched_run_equals_single_runs(algo_kw):
    seeds = [7, 3, 11]
    many = batched.train_batched("CartPole-v1", seeds=seeds, **SHORT, **algo_kw)
    for k in (0, 2):  # the first and the last of the stack
        one = dqn.train_dqn("CartPole-v1", seed=seeds[k], **SHORT, **algo_kw)
        assert many[k].config["seed"] == seeds[k]
        # same exploration, same greedy actions, same env streams -> identical episodes and evaluations
        assert one.episodes.equals(many[k].episodes)
        np.testing.assert_array_equal(one.evals["eval/return_mean"], many[k].evals["eval/return_mean"])
        np.testing.assert_array_equal(one.losses["step"], many[k].losses["step"])
        for col in ("losses/td_loss", "losses/mean_batch_loss", "losses/max_batch_loss", "losses/q_values"):
            np.testing.assert_allclose(many[k].losses[col], one.losses[col], rtol=RTOL)
        assert one.metrics["train/grad_steps"] == many[k].metrics["train/grad_steps"]
    assert not many[0].episodes.equals(many[1].episodes)  # different seeds, different runs


def _filled(capacity, obs_dim, n_add, seed):
    rng = np.random.default_rng(seed)
    data = [(rng.normal(size=obs_dim).astype(np.float32), int(rng.integers(3)), float(rng.normal()),
             rng.normal(size=obs_dim).astype(np.float32), bool(rng.random() < 0.1)) for _ in range(n_add)]
    return data


@pytest.mark.parametrize("capacity,n_add,m,b", [(50, 30, 1, 1), (20, 45, 3, 5), (64, 64, 2, 7)])
def test_stacked_replay_draws_the_single_buffers_indices(capacity, n_add, m, b):
    seeds = [4, 9]
    stacked = batched.StackedReplay(capacity, 3, seeds)
    singles = [dqn.ReplayBuffer(capacity, 3, seed=s + dqn.BUFFER_SEED_OFFSET) for s in seeds]
    per_run = [_filled(capacity, 3, n_add, s) for s in seeds]
    for t in range(n_add):
        rows = [per_run[i][t] for i in range(2)]
        stacked.add(*(np.stack([r[j] for r in rows]) for j in range(5)))
        for i, rb in enumerate(singles):
            rb.add(*rows[i])
    for _ in range(3):
        idx, w = stacked.sample_indices(b, m)
        assert w is None and idx.shape == (2, m, b)
        got = stacked.gather(idx)
        for i, rb in enumerate(singles):
            ref = rb.sample(b, m)
            np.testing.assert_array_equal(idx[i], ref.indices)
            np.testing.assert_array_equal(got["obs"][i].numpy(), ref.obs.reshape(m * b, -1))
            np.testing.assert_array_equal(got["dones"][i].numpy(), ref.dones.reshape(-1))


@pytest.mark.parametrize("algo,m,b,clip", [("ddqn", 1, 1, 0.0), ("ddqn", 1, 33, 10.0), ("dqn", 1, 8, 0.0),
                                           ("m2dqn", 3, 5, 10.0), ("m2dqn", 4, 16, 0.05)])
def test_stacked_update_equals_td_update(algo, m, b, clip):
    """Same weights, same minibatch -> same losses and the same weights after several steps, for each run."""
    n, obs_dim, n_actions, hidden = 3, 5, 3, (16, 12)
    args = dqn.make_args("CartPole-v1", algo=algo, num_batches=m, max_grad_norm=clip, learning_rate=1e-2)
    nets, tnets = [], []
    for s in range(n):
        torch.manual_seed(s)
        nets.append(dqn.QNetwork(obs_dim, n_actions, hidden))
        tnets.append(dqn.QNetwork(obs_dim, n_actions, hidden))
    q, t = batched.StackedQNet(nets), batched.StackedQNet(tnets)
    opt = torch.optim.Adam(q.parameters(), lr=args.learning_rate, fused=True)
    opts = [torch.optim.Adam(net.parameters(), lr=args.learning_rate, fused=True) for net in nets]
    rng = np.random.default_rng(0)
    for _ in range(4):
        shape = (n, m * b)
        batch = {"obs": rng.normal(size=(*shape, obs_dim)).astype(np.float32),
                 "next_obs": rng.normal(size=(*shape, obs_dim)).astype(np.float32),
                 "actions": rng.integers(0, n_actions, size=shape),
                 "rewards": rng.normal(size=shape).astype(np.float32),
                 "dones": (rng.random(shape) < 0.2).astype(np.float32)}
        out = batched.stacked_td_update(q, t, opt, {k: torch.from_numpy(v) for k, v in batch.items()}, args, m)
        for i in range(n):
            one = dqn.Batch(*(batch[k][i].reshape(m, b, *batch[k].shape[2:]) for k in
                              ("obs", "actions", "rewards", "next_obs", "dones")), indices=np.zeros((m, b)))
            ref = dqn.td_update(nets[i], tnets[i], opts[i], one, args)
            torch.testing.assert_close(out["loss"][i], ref["losses/td_loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["batch_losses"][i], ref["batch_losses"], rtol=1e-5, atol=1e-6)
    for i in range(n):
        for a, r in zip(q.run_network(i).parameters(), nets[i].parameters()):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_controls_sample_and_update_counts():
    """Per gradient step M2DQN sees M*B samples; 'batch MB' sees M*B in one batch; 'M steps' makes M times the
    gradient steps of B; PER keeps DDQN's B and schedule."""
    kw = dict(SHORT, total_steps=700, eval_interval=700, batch_size=8)
    cfgs = grid.method_configs(3, sweep_m=())
    seen = {}
    for name, cfg in cfgs.items():
        env_id, _, k = grid.resolve({"env_id": "CartPole-v1", **cfg, **kw})
        run = batched.train_batched(env_id, seeds=[1], **k)[0]
        a = run.config
        seen[name] = (a["batch_size"] * a["num_batches"], run.metrics["train/grad_steps"], a["replay"])
    calls = (700 - 300) // 64
    assert seen["DDQN"] == (8, calls * 8, "uniform")
    assert seen["M2DQN"] == (24, calls * 8, "uniform")
    assert seen["DDQN batch MB"] == (24, calls * 8, "uniform")
    assert seen["DDQN M steps"] == (8, calls * 24, "uniform")
    assert seen["DDQN PER"] == (8, calls * 8, "prioritized")
    assert seen["M2DQN tilted"] == (24, calls * 8, "uniform")


def test_m2dqn_logs_the_chosen_batch_ratio():
    run = batched.train_batched("CartPole-v1", seeds=[1], algo="m2dqn", num_batches=4, **SHORT)[0]
    r = run.losses["losses/max_over_mean"].to_numpy()
    assert np.all(r >= 1.0 - 1e-6)  # the max of M means is at least their mean
    ddqn = batched.train_batched("CartPole-v1", seeds=[1], algo="ddqn", **SHORT)[0]
    np.testing.assert_allclose(ddqn.losses["losses/max_over_mean"], 1.0, rtol=1e-6)


def test_stacked_net_roundtrip_and_bad_input():
    torch.manual_seed(0)
    nets = [dqn.QNetwork(4, 2, (8,)) for _ in range(3)]
    q = batched.StackedQNet(nets)
    x = torch.randn(3, 5, 4)
    for i in range(3):
        torch.testing.assert_close(q(x)[i], nets[i](x[i]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q.run_network(i)(x[i]), nets[i](x[i]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x must"):
        q(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="same layer shapes"):
        batched.StackedQNet([dqn.QNetwork(4, 2, (8,)), dqn.QNetwork(4, 2, (9,))])
    with pytest.raises(ValueError, match="nets"):
        batched.StackedQNet([])
    with pytest.raises(ValueError, match="seeds"):
        batched.train_batched("CartPole-v1", seeds=[1, 1])
    with pytest.raises(ValueError, match="seed"):
        batched.train_batched("CartPole-v1", seeds=[1], seed=2)
    with pytest.raises(ValueError, match="replay"):
        batched.train_batched("CartPole-v1", seeds=[1], algo="m2dqn", num_batches=2, replay="prioritized")
    with pytest.raises(ValueError, match="empty"):
        batched.StackedReplay(4, 2, [1]).sample_indices(2)


# -- prioritized replay --------------------------------------------------------------------------------------------
def test_per_probabilities_and_weights_by_hand():
    p = np.array([1.0, 3.0, 4.0])
    np.testing.assert_allclose(per.per_probabilities(p), [0.125, 0.375, 0.5])
    probs = np.array([0.125, 0.5])
    w = per.per_weights(probs, n=3, beta=1.0)  # (3 P)^-1 = [8/3, 2/3] -> / max
    np.testing.assert_allclose(w, [1.0, 0.25])
    np.testing.assert_allclose(per.per_weights(probs, 3, 0.0), [1.0, 1.0])  # beta 0: no correction
    np.testing.assert_allclose(per.per_weights(probs, 3, 0.5), np.sqrt([1.0, 0.25]))
    for bad in (np.array([]), np.array([0.0, 0.0]), np.array([1.0, -1.0])):
        with pytest.raises(ValueError, match="priorities"):
            per.per_probabilities(bad)
    with pytest.raises(ValueError, match="beta"):
        per.per_weights(probs, 3, 1.5)
    with pytest.raises(ValueError, match="probs"):
        per.per_weights(np.array([0.0, 0.5]), 3, 0.5)
    with pytest.raises(ValueError, match="n must"):
        per.per_weights(probs, 0, 0.5)


def test_priority_sampler_frequencies_priorities_and_weights():
    s = per.PrioritySampler(8, alpha=0.5, rng=np.random.default_rng(0))
    for i in range(4):
        s.added(i)
    assert np.all(s.priorities[:4] == 1.0)  # new transitions: the max priority so far
    s.update(np.array([0, 1, 2, 3]), np.array([0.0, 3.0, 8.0, 15.0]))
    np.testing.assert_allclose(s.priorities[:4], (np.array([0.0, 3.0, 8.0, 15.0]) + per.PER_EPS) ** 0.5)
    assert s.max_priority == pytest.approx(np.sqrt(15.0), rel=1e-6)
    s.added(4)
    assert s.priorities[4] == s.max_priority
    idx, w = s.sample(5, (200_000,), beta=0.7)
    probs = per.per_probabilities(s.priorities[:5])
    freq = np.bincount(idx, minlength=5) / idx.size
    # 200k draws: the binomial std of each frequency is < 0.0012; 0.005 is ~4 std
    np.testing.assert_allclose(freq, probs, atol=5e-3)
    assert idx.max() < 5 and idx.dtype == np.int64
    np.testing.assert_allclose(w, per.per_weights(probs[idx], 5, 0.7).astype(np.float32))
    assert w.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="capacity"):
        per.PrioritySampler(0, 0.6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        s.sample(0, (2,), 0.5)


def test_per_run_trains_and_uses_weights():
    run = batched.train_batched("CartPole-v1", seeds=[2, 5], replay="prioritized", **SHORT)
    assert all(r.config["replay"] == "prioritized" for r in run)
    uni = batched.train_batched("CartPole-v1", seeds=[2, 5], **SHORT)
    # prioritized sampling changes what is learned from the first update on
    assert not np.allclose(run[0].losses["losses/td_loss"], uni[0].losses["losses/td_loss"])


def test_per_beta_schedule():
    assert per.per_beta(0.4, 0, 1000) == 0.4
    assert per.per_beta(0.4, 500, 1000) == pytest.approx(0.7)
    assert per.per_beta(0.4, 1000, 1000) == 1.0 and per.per_beta(0.4, 5000, 1000) == 1.0
    with pytest.raises(ValueError, match="beta0 must be in"):
        per.per_beta(1.5, 0, 10)


def test_per_importance_weights_scale_each_sample_gradient():
    """stacked_td_update with PER weights takes the gradient of mean_i w_i huber_i per run - checked against the
    same loss written out by hand on a plain QNetwork; fails if the weights are dropped (they are far from 1)."""
    args = dqn.make_args("CartPole-v1", algo="ddqn", batch_size=32, hidden=(16, 16), max_grad_norm=0.0)
    torch.manual_seed(3)
    nets = [dqn.QNetwork(4, 2, args.hidden) for _ in range(2)]
    q, t = batched.StackedQNet(nets), batched.StackedQNet([dqn.QNetwork(4, 2, args.hidden) for _ in range(2)])
    batch = _random_batch(32, 2, seed=4)
    w = torch.from_numpy(np.random.default_rng(5).uniform(0.05, 1.0, (2, 32)).astype(np.float32))
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    before_w = [p.detach().clone() for p in q.weights]
    before_b = [p.detach().clone() for p in q.biases]
    out = batched.stacked_td_update(q, t, opt, batch, args, 1, is_weights=w)
    for i in range(2):  # the reference: run i alone, weighted loss by hand
        net, tgt = q.__class__([nets[i]]).run_network(0), t.run_network(i)
        obs, nxt = batch["obs"][i], batch["next_obs"][i]
        with torch.no_grad():
            a_star = net(nxt).argmax(dim=1, keepdim=True)
            y = batch["rewards"][i] + args.gamma * (1 - batch["dones"][i]) * tgt(nxt).gather(1, a_star).squeeze(1)
        q_sa = net(obs).gather(1, batch["actions"][i].unsqueeze(1)).squeeze(1)
        loss = (w[i] * torch.nn.functional.smooth_l1_loss(q_sa, y, reduction="none")).mean()
        loss.backward()
        torch.testing.assert_close(out["loss"][i], loss.detach(), rtol=1e-6, atol=1e-7)
        lins = [m for m in net.net if isinstance(m, torch.nn.Linear)]
        for k, lin in enumerate(lins):  # SGD, lr 1: the step is minus the gradient
            torch.testing.assert_close(before_w[k][i] - q.weights[k].detach()[i], lin.weight.grad.T,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(before_b[k][i, 0] - q.biases[k].detach()[i, 0], lin.bias.grad,
                                       rtol=1e-5, atol=1e-6)


def test_per_training_anneals_beta_and_feeds_the_weights_to_the_update(monkeypatch):
    """Every PER draw in train_batched uses beta = per_beta(per_beta0, step, total_steps) at the step of the
    training call, and the update gets exactly the weights the sampler returned for that beta."""
    drawn, used = [], []
    sample = per.PrioritySampler.sample

    def spy_sample(self, size, shape, beta):
        idx, w = sample(self, size, shape, beta)
        drawn.append((beta, w))
        return idx, w

    update = batched.stacked_td_update

    def spy_update(*a, **k):
        used.append(a[6] if len(a) > 6 else k.get("is_weights"))
        return update(*a, **k)

    monkeypatch.setattr(per.PrioritySampler, "sample", spy_sample)
    monkeypatch.setattr(batched, "stacked_td_update", spy_update)
    kw = dict(SHORT, per_beta=0.2)
    batched.train_batched("CartPole-v1", seeds=[2, 5], replay="prioritized", **kw)
    steps = [s for s in range(kw["learning_starts"] + 1, kw["total_steps"] + 1) if s % kw["train_frequency"] == 0]
    expected = [per.per_beta(0.2, s, kw["total_steps"]) for s in steps for _ in range(kw["grad_steps"] * 2)]
    assert [b for b, _ in drawn] == pytest.approx(expected, abs=1e-12)
    assert expected[0] < 0.5 < expected[-1]  # the schedule moves over this run
    assert len(used) == len(drawn) // 2
    for k, w in enumerate(used):  # the two runs' weights, stacked, as drawn
        np.testing.assert_array_equal(w.numpy(), np.stack([drawn[2 * k][1], drawn[2 * k + 1][1]]).reshape(2, -1))
    assert min(float(w.min()) for w in used) < 0.9  # after the first priorities: the weights carry information


FLOP_ALGOS = [dict(algo="ddqn"), dict(algo="dqn"), dict(algo="m2dqn", num_batches=3)]


def _random_batch(rows: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {"obs": torch.randn(n, rows, 4), "next_obs": torch.randn(n, rows, 4),
            "actions": torch.from_numpy(rng.integers(0, 2, (n, rows))), "rewards": torch.randn(n, rows),
            "dones": torch.zeros(n, rows)}


@pytest.mark.parametrize("algo_kw", FLOP_ALGOS, ids=["ddqn", "dqn", "m2dqn"])
def test_update_flops_equals_torch_flop_counter_batched(algo_kw):
    """bench.update_flops(trainer="batched") against torch's FLOP counter over one stacked update of 3 runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from helpers.m2dqn import bench

    args = dqn.make_args("CartPole-v1", batch_size=16, hidden=(24, 40), **algo_kw)
    torch.manual_seed(0)
    nets = [dqn.QNetwork(4, 2, args.hidden) for _ in range(3)]
    q, t = batched.StackedQNet(nets), batched.StackedQNet(nets)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    batch = _random_batch(args.batch_size * args.num_batches, 3)
    with FlopCounterMode(display=False) as counter:
        batched.stacked_td_update(q, t, opt, batch, args, args.num_batches)
    assert 3 * bench.update_flops(args, 4, 2, trainer="batched") == counter.get_total_flops()


@pytest.mark.parametrize("algo_kw", FLOP_ALGOS, ids=["ddqn", "dqn", "m2dqn"])
def test_update_flops_equals_torch_flop_counter_single(algo_kw):
    """bench.update_flops(trainer="single") against torch's FLOP counter over one td_update of the single-run
    trainer (Double DQN's online net runs on cat[s, s'] with autograd: the backward covers 2R rows)."""
    from torch.utils.flop_counter import FlopCounterMode

    from helpers.m2dqn import bench

    args = dqn.make_args("CartPole-v1", batch_size=16, hidden=(24, 40), **algo_kw)
    torch.manual_seed(0)
    q, t = dqn.QNetwork(4, 2, args.hidden), dqn.QNetwork(4, 2, args.hidden)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    rb = dqn.ReplayBuffer(200, 4, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        rb.add(rng.normal(size=4).astype(np.float32), int(rng.integers(2)), 1.0,
               rng.normal(size=4).astype(np.float32), False)
    with FlopCounterMode(display=False) as counter:
        dqn.td_update(q, t, opt, rb.sample(args.batch_size, args.num_batches), args)
    assert bench.update_flops(args, 4, 2, trainer="single") == counter.get_total_flops()
    with pytest.raises(ValueError, match="trainer must be one of"):
        bench.update_flops(args, 4, 2, trainer="sb3")


def test_update_flops_at_the_zoo_cartpole_settings():
    """The issue's numbers: 59.8 MFLOP per single-run Double DQN step, 42.8 per batched step and run."""
    from helpers.m2dqn import bench

    a = dqn.make_args("CartPole-v1")  # 256x256, B = 64
    assert bench.update_flops(a, 4, 2, trainer="single") == pytest.approx(59.834368e6, abs=1)
    assert bench.update_flops(a, 4, 2, trainer="batched") == pytest.approx(42.795008e6, abs=1)


def test_batched_speedup_table():
    from helpers.m2dqn import bench

    out = bench.batched_speedup("CartPole-v1", n_runs=3, steps=300, label="tiny", hidden=(16, 16),
                                train_frequency=50, grad_steps=2)
    assert out["trainer"].tolist() == ["single-run", "batched x 3"] and out["speedup"].iloc[0] == 1.0
    np.testing.assert_allclose(out["speedup"].iloc[1], out["env_steps_per_s"].iloc[1] / out["env_steps_per_s"].iloc[0])
    assert (out["gflops"] > 0).all() and (out["peak_gflops"] > 0).all()
    assert out["ceiling"].nunique() == 1 and out["ceiling"].iloc[0] > 1.0  # tiny net: far from compute-bound
    b = out.iloc[1]
    np.testing.assert_allclose(b["ceiling_ratio"], b["speedup"] / b["ceiling"], rtol=1e-12)
    assert ((out["ceiling_ratio"] > 0) & (out["ceiling_ratio"] < 1)).all()
