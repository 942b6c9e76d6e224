"""The study of notebook 03 (only notebooks import it): :mod:`helpers.estimators.markov`, a Markov softmax policy
whose exact policy gradient is known, and the estimator study against it; :mod:`helpers.estimators.learning`, a
policy-gradient learning toy with a sampler floor on the rollout policy (a floor, not FP8: see its docstring)."""
