"""The M2DQN study of notebook 04 (only notebooks import it): :mod:`helpers.m2dqn.dqn` (DQN / Double DQN / M2DQN,
the single-run reference, readable top to bottom), :mod:`helpers.m2dqn.batched` (the same for N seeds at once, one
stacked network), :mod:`helpers.m2dqn.per` (prioritized replay control), :mod:`helpers.m2dqn.grid` (the methods
compared and the run grid, on a local process pool or Ray), :mod:`helpers.m2dqn.decide` (the pre-registered decision
rules and the aggregate over games), :mod:`helpers.m2dqn.campaign` (the resumable extra runs on the paper's games) and
:mod:`helpers.m2dqn.bench` (batched vs single-run throughput, FLOP counts)."""
