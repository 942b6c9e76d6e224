"""The M2DQN study of notebook 04 (only notebooks import it): :mod:`helpers.m2dqn.dqn` (DQN / Double DQN / M2DQN,
readable top to bottom), :mod:`helpers.m2dqn.grid` (the methods compared and the parallel run grid) and
:mod:`helpers.m2dqn.bench` (steps/s of the training loop, cost of an M2DQN update)."""
