"""Split stage: entropy → easy / medium / hard bands (and a held-out test set). No GPU.

Bands are half-open and bounded on both sides: easy < t_low <= medium < t_high <= hard (the
v1/v2 splits released with arXiv 2506.21220 had a medium band with no upper bound that overlapped
hard; tests/split/test_rules.py::test_bands_are_bounded_and_disjoint_no_middle_band_bug). Training
rows are banded by rank of (entropy, id): the same as the thresholds when entropies are distinct, and
when many rows share one value (coarse entropies) the rows tied at a threshold are split by id, so
band sizes follow the quantiles and the split stays deterministic. Thresholds come from the training
pool only; the held-out set is drawn first (whole duplicate groups) and banded by the same rule.

- ``rules``: thresholds, rank and held-out bands on arrays;
- ``holdout``: id ranks, duplicate groups, the seeded draws;
- ``plan``: the decision on compact per-row arrays, and ``split_frame`` for a small frame;
- ``stage``: the stage, streaming the run dir's files through that decision.
"""
