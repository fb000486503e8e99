"""Costs for tests that must see drafting through the default ``auto`` schedule: verification
as cheap as one token and nearly free drafts, held fixed, so ``auto`` drafts ``k_max`` every round
whatever this machine's BLAS (the schedule's own choices are tested in test_costs.py)."""

from mlx_gemma_mtp.costs import Costs

ALWAYS_DRAFT = Costs([0.01] * 34, 1e-4, fixed=True)
# The same, with speculative sampling's rows filtered and drawn on the host (numpy).
ON_HOST = Costs([0.01] * 34, 1e-4, fixed=True, sampling_on=["host"] * 34)
