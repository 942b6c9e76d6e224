"""The decision rules of notebook 03 (helpers.estimators.verdicts) on hand-built study tables: each rule's branches."""

import pandas as pd
import pytest

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.estimators import verdicts as V

P = ("gaussian", 0.3)
Q = ("gaussian", 0.1)
TS = (1, 2, 64)


def _table(values: dict, perts=(P, Q)) -> pd.DataFrame:
    """values: {(estimator, column): {T: value}} shared by every perturbation, or {(pert, est, col): {T: v}}."""
    ests = {k[-2] for k in values}
    rows = []
    for kind, scale in perts:
        for T in TS:
            for e in ests:
                row = {"perturbation": kind, "scale": scale, "T": T, "estimator": e, "rel_bias": 0.0,
                       "rel_bias_noise": 0.01, "rel_var": 1.0, "kept_fraction": 1.0, "k3_kl": 0.01}
                for key, by_t in values.items():
                    if key[-2] != e or (len(key) == 3 and key[0] != (kind, scale)):
                        continue
                    row[key[-1]] = by_t[T]
                rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("bias,expected", [((0.002, 0.1, 0.11), "partly"), ((0.002, 0.1, 0.3), "reproduced"),
                                           ((0.002, 0.004, 0.3), "not reproduced")])
def test_token_is_bias(bias, expected):
    assert V.token_is_bias_verdict(bias, 0.01, TS)[0] == expected


def test_seq_is_and_mis_trade():
    assert V.seq_is_verdict(0.01, 0.02, (4.0, 140.0), (1, 64))[0] == "reproduced"
    assert V.seq_is_verdict(0.2, 0.02, (4.0, 140.0), (1, 64))[0] == "partly"  # biased
    assert V.seq_is_verdict(0.01, 0.02, (4.0, 8.0), (1, 64))[0] == "partly"  # variance did not grow 10x
    assert V.seq_mis_trade_verdict((0.7, 3.0), (0.05, 140.0), 64)[0] == "reproduced"
    assert V.seq_mis_trade_verdict((0.01, 3.0), (0.05, 140.0), 64)[0] == "not reproduced"


def test_length_trap_branches():
    trap = {("seq_mis", "kept_fraction"): {1: 1.0, 2: 0.9, 64: 0.3}}
    good = {("geo_rs", "kept_fraction"): {1: 0.9, 2: 0.9, 64: 0.95}, ("k3_rs", "kept_fraction"): {1: 0.8, 2: 0.8, 64: 0.9}}
    assert V.length_trap_verdict(_table({**trap, **good}), [P, Q])[0] == "reproduced"
    # Geo-RS rejects almost everything at every T: length-"invariant" but escapes no trap
    bad_geo = {**good, ("geo_rs", "kept_fraction"): {1: 0.0, 2: 0.01, 64: 0.05}}
    assert V.length_trap_verdict(_table({**trap, **bad_geo}), [P, Q])[0] == "partly"
    none = {("geo_rs", "kept_fraction"): {1: 0.0, 2: 0.0, 64: 0.0}, ("k3_rs", "kept_fraction"): {1: 0.8, 2: 0.5, 64: 0.2}}
    assert V.length_trap_verdict(_table({**trap, **none}), [P, Q])[0] == "not reproduced"
    no_trap = {("seq_mis", "kept_fraction"): {1: 1.0, 2: 1.0, 64: 0.9}}
    assert V.length_trap_verdict(_table({**no_trap, **good}), [P, Q])[0] == "not reproduced"


def test_batch_norm_and_bypass():
    t = {("token_tis", "rel_var"): {1: 4, 2: 12, 64: 13.0}, ("token_tis_bn", "rel_var"): {1: 4, 2: 12, 64: 10.0},
         ("seq_tis", "rel_var"): {1: 4, 2: 12, 64: 9.0}, ("seq_tis_bn", "rel_var"): {1: 4, 2: 12, 64: 19.0}}
    assert V.batch_norm_verdict(_table(t), *P)[0] == "partly"
    t[("seq_tis_bn", "rel_var")] = {1: 4, 2: 12, 64: 5.0}
    assert V.batch_norm_verdict(_table(t), *P)[0] == "reproduced"
    t[("token_tis_bn", "rel_var")] = {1: 4, 2: 12, 64: 13.0}
    t[("seq_tis_bn", "rel_var")] = {1: 4, 2: 12, 64: 9.0}
    assert V.batch_norm_verdict(_table(t), *P)[0] == "not reproduced"
    b = {("token_tis", "rel_bias"): {1: 0.002, 2: 0.1, 64: 0.1},
         (P, "bypass_ppo_clip", "rel_bias"): {1: 0.6, 2: 0.6, 64: 0.6},
         (Q, "bypass_ppo_clip", "rel_bias"): {1: 0.01, 2: 0.1, 64: 0.15}}
    assert V.bypass_ppo_clip_verdict(_table(b), [P, Q])[0] == "partly"
    assert V.bypass_ppo_clip_verdict(_table(b), [Q])[0] == "reproduced"
    assert V.bypass_ppo_clip_verdict(_table(b), [P])[0] == "not reproduced"


def test_token_rules_and_study_verdicts_list():
    vals = {(e, "rel_bias"): {1: 0.002, 2: 0.1, 64: 0.1}
            for e in ("token_tis", "token_icepop", "token_tis_bn", "bypass_ppo_clip", "seq_is", "seq_mis")}
    assert V.token_rules_bias_verdict(_table(vals), *P)[0] == "reproduced"
    vals[("bypass_ppo_clip", "rel_bias")] = {1: 0.0, 2: 0.0, 64: 0.02}
    assert V.token_rules_bias_verdict(_table(vals), *P)[0] == "partly"
    out = V.study_verdicts(_table(vals), [P, Q])
    assert [o["verdict"] for o in out][:1] == ["partly"] and len(out) == 5  # no geo/k3/seq_tis_bn rows here
    assert all(set(o) == {"claim", "verdict", "reason"} and o["reason"] for o in out)
    with pytest.raises(ValueError, match="expected one row"):
        V.at(_table(vals), "gaussian", 0.3, 3, "seq_is", "rel_bias")


def test_learning_verdicts():
    summary = pd.DataFrame({"method": ["matched", "uncorrected", "token_tis", "seq_is"],
                            "final_return": [0.98, 0.85, 0.85, 0.97], "gap_closed": [1.0, 0.0, 0.01, 0.9],
                            "cost_fraction": [0.0, 0.0, 0.0, 0.0], "kl": [0.0, 0.05, 0.05, 0.05]})
    fp8 = pd.DataFrame({"method": ["matched", "uncorrected"], "final_return": [0.99, 0.99], "kl": [0.0, 1e-5]})
    out = V.learning_verdicts(summary, fp8)
    assert [o["verdict"] for o in out] == ["not testable here", "not reproduced"]
    assert "seq_is closes +90%" in out[1]["reason"]
    summary.loc[2, "gap_closed"] = 0.6
    assert V.learning_verdicts(summary, fp8)[1]["verdict"] == "reproduced"
    summary.loc[2, "gap_closed"] = 0.3
    assert V.learning_verdicts(summary, fp8)[1]["verdict"] == "partly"
