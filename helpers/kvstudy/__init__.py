"""The study of notebook 02 (only notebooks import it): :mod:`helpers.kvstudy.drift`, a decoder trained with real
optimizer steps so that its Q/K/V statistics move, evaluated each step under every KV-scale policy; and
:mod:`helpers.kvstudy.outliers`, what planted outlier channels do to a per-tensor or per-head scale. The building
blocks they use live in :mod:`helpers.kvcache` and :mod:`helpers.models`."""
