"""helpers.m2dqn.campaign: the resumable extra runs (one file per run, skipped on restart, protocol locked) on a tiny
CartPole plan; the CLI's dry run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers.m2dqn import campaign, grid

TINY_PLAN = {"tiny": [("CartPole-v1", ("DDQN", "M2DQN"), 1.0, (1, 2, 3)), ("CartPole-v1", ("DDQN",), 0.5, (1, 2))]}
# 1% of the zoo's CartPole budget: 500 env steps, one training call of 128 gradient steps
TINY = dict(steps_scale=0.01, seeds_per_task=2, jobs=1, progress=False)


@pytest.fixture
def tiny_plan(monkeypatch):
    monkeypatch.setattr(campaign, "PLANS", TINY_PLAN)


def test_plans_cover_the_issue_and_share_cartpole_runs():
    specs = campaign.plan_runs(["cartpole", "games"])
    games = campaign.plan_runs(["games"])
    assert len(games) == 4 * 2 * 20
    # CartPole DDQN / M2DQN seeds 1-10 at the zoo rate belong to both plans and are planned once
    assert len(specs) == len(games) + 10 * (len(campaign.CARTPOLE_METHODS) - 2) + 2 * 10
    sens = [s for s in specs if s.lr_factor != 1.0]
    assert {s.arm for s in sens} == {"DDQN @ lr x0.5", "M2DQN @ lr x0.5"}
    with pytest.raises(ValueError, match="plans must name some of"):
        campaign.plan_runs(["atari"])


def test_plans_filtered_by_game_and_method():
    games = campaign.plan_runs(["games"])
    one = campaign.plan_runs(["games"], envs=["Acrobot-v1"], methods=["DDQN"])
    assert one == [s for s in games if s.env_id == "Acrobot-v1" and s.method == "DDQN"] and len(one) == 20
    two = campaign.plan_runs(["games"], envs=["CartPole-v1", "MountainCar-v0"])
    assert {(s.env_id, s.method) for s in two} == {(e, m) for e in ("CartPole-v1", "MountainCar-v0")
                                                    for m in ("DDQN", "M2DQN")}
    with pytest.raises(ValueError, match="envs must name some of"):
        campaign.plan_runs(["games"], envs=["Pong-v5"])
    with pytest.raises(ValueError, match="methods must name some of"):
        campaign.plan_runs(["games"], methods=["DDQN PER"])  # a CartPole control is not in the games plan


def test_runs_are_saved_one_file_each_and_skipped_on_restart(tmp_path, tiny_plan, monkeypatch):
    out = tmp_path / "study"
    first = campaign.run_campaign(out, ["tiny"], **TINY)
    assert first == {"planned": 8, "done_before": 0, "trained": 8}
    files = sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("*.json.gz"))
    assert files == [f"runs/CartPole-v1/{arm}/seed_00{s}.json.gz" for arm, seeds in
                     (("DDQN", (1, 2, 3)), ("DDQN@lr_x0.5", (1, 2)), ("M2DQN", (1, 2, 3))) for s in seeds]
    proto = json.loads((out / "protocol.json").read_text())
    assert proto["lr_protocol"] == campaign.LR_PROTOCOL and proto["decisions"]["target_effect"] == 0.05

    runs = campaign.load_runs(out)
    m = runs["metrics"]
    assert sorted(m.method.unique()) == ["DDQN", "DDQN @ lr x0.5", "M2DQN"]
    lr = m.groupby("method")["learning_rate"].first()
    assert lr["DDQN @ lr x0.5"] == pytest.approx(0.5 * lr["DDQN"]) and lr["M2DQN"] == lr["DDQN"]
    assert set(runs["evals"].groupby(["method", "seed"]).size()) == {campaign.EVALS_PER_RUN}
    hours = campaign.core_hours(m)
    assert (hours.core_hours > 0).all() and hours.runs.sum() == 8

    # restart: nothing to do
    assert campaign.run_campaign(out, ["tiny"], **TINY)["trained"] == 0
    # a lost run retrains its whole seed group (seeds 3 alone: group 3-4), and only that group
    lost = out / "runs/CartPole-v1/M2DQN/seed_003.json.gz"
    before = runs["evals"][(runs["evals"].method == "M2DQN") & (runs["evals"].seed == 3)].reset_index(drop=True)
    lost.unlink()
    again = campaign.run_campaign(out, ["tiny"], **TINY)
    assert again == {"planned": 8, "done_before": 7, "trained": 1}
    ev = campaign.load_runs(out)["evals"]
    after = ev[(ev.method == "M2DQN") & (ev.seed == 3)].reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)  # the same seed group: the same run

    # another protocol in the same directory is refused
    with pytest.raises(ValueError, match="another protocol .*steps_scale"):
        lost.unlink()
        campaign.run_campaign(out, ["tiny"], **{**TINY, "steps_scale": 0.02})


def test_an_interrupted_study_keeps_what_finished(tmp_path, tiny_plan, monkeypatch):
    real = grid.run_arm

    def dies_on_the_sensitivity_arm(cfg):
        if "@ lr" in cfg["method"]:
            raise KeyboardInterrupt("stopped")
        return real(cfg)

    monkeypatch.setattr(grid, "run_arm", dies_on_the_sensitivity_arm)
    with pytest.raises(KeyboardInterrupt):
        campaign.run_campaign(tmp_path, ["tiny"], **TINY)  # costliest first: M2DQN 1-2, then DDQN 1-2, ...
    saved = campaign.load_runs(tmp_path)["metrics"]
    done = set(zip(saved.method, saved.seed))
    assert {("M2DQN", 1), ("M2DQN", 2), ("DDQN", 1), ("DDQN", 2)} <= done  # the arms that finished first
    assert not any(m == "DDQN @ lr x0.5" for m, _ in done)
    monkeypatch.setattr(grid, "run_arm", real)
    assert campaign.run_campaign(tmp_path, ["tiny"], **TINY)["trained"] == 8 - len(done)


def test_cli_dry_run_and_errors(tmp_path, capsys):
    assert campaign.main(["--plan", "games", "--out", str(tmp_path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "160 runs planned, 0 done, 160 to train in 16 tasks" in text and "MountainCar-v0" in text
    assert not (tmp_path / "protocol.json").exists()  # a dry run writes nothing
    assert campaign.main(["--plan", "games", "--env", "Acrobot-v1", "--method", "M2DQN", "--out", str(tmp_path),
                          "--dry-run"]) == 0
    assert "20 runs planned, 0 done, 20 to train in 2 tasks" in capsys.readouterr().out
    assert campaign.main(["--plan", "games", "--out", str(tmp_path), "--steps-scale", "2", "--dry-run"]) == 2
    assert "steps_scale must be in (0, 1]" in capsys.readouterr().err
    est = campaign.estimate_core_hours(campaign.pending_tasks(tmp_path, campaign.plan_runs(["games"]),
                                                              campaign.protocol()))
    # M2DQN (M = 2) costs about twice DDQN per game
    ratio = est.set_index(["env_id", "method"]).core_hours
    np.testing.assert_allclose(ratio.xs("M2DQN", level=1) / ratio.xs("DDQN", level=1), 2.0, rtol=0.02)


def test_a_notebook_grid_reads_the_arms_the_study_trained_exactly(tmp_path, tiny_plan, monkeypatch):
    out = tmp_path / "study"
    campaign.run_campaign(out, ["tiny"], **TINY)
    proto = json.loads((out / "protocol.json").read_text())
    same = campaign._arm_cfg("CartPole-v1", "M2DQN", 1.0, [1, 2], proto)  # seed group 1-2: trained as the study did
    sens = campaign._arm_cfg("CartPole-v1", "DDQN", 0.5, [1, 2], proto)
    # half a batched group (rounds differently), other settings: trained here
    subset = {**campaign._arm_cfg("CartPole-v1", "DDQN", 1.0, [1], proto), "method": "DDQN seed 1"}
    other = {**campaign._arm_cfg("CartPole-v1", "DDQN", 1.0, [1, 2], proto), "eval_episodes": 3, "method": "DDQN 3"}
    arms = [same, sens, subset, other]
    keys = [("M2DQN", 1.0), ("DDQN", 0.5), ("DDQN", 1.0), ("DDQN", 1.0)]
    fresh = grid.run_grid(arms[:2], jobs=1, progress=False)  # what training them here gives

    trained = []
    real = grid.run_grid

    def counting(arms, **kw):
        trained.extend(a["method"] for a in arms)
        return real(arms, **kw)

    monkeypatch.setattr(grid, "run_grid", counting)
    tables, read = campaign.train_or_read(arms, keys, out, jobs=1, progress=False)
    assert read == [True, True, False, False] and len(trained) == 2
    for name in ("episodes", "evals", "losses"):
        got = tables[name][tables[name].method.isin([same["method"], sens["method"]])].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, fresh[name], check_dtype=False)  # read == trained, value for value
    assert tables["metrics"].groupby("method", sort=False).size().to_dict() == {
        "M2DQN": 2, "DDQN @ lr x0.5": 2, "DDQN seed 1": 1, "DDQN 3": 2}
    # no study, or a different one: everything trains
    assert campaign.train_or_read(arms[:1], keys[:1], None, jobs=1, progress=False)[1] == [False]
    assert campaign.study_arm(tmp_path / "none", same, "M2DQN", 1.0) is None
    with pytest.raises(ValueError, match="one \\(method, lr_factor\\) key per arm"):
        campaign.train_or_read(arms, keys[:1], out)
    with pytest.raises(ValueError, match="share an"):
        campaign.train_or_read([same, same], keys[:1] * 2, out)
