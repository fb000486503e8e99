"""Costs for tests that must see drafting through the default ``auto`` schedule: verification
as cheap as one token and nearly free drafts, held fixed, so ``auto`` drafts ``k_max`` every round
whatever this machine's BLAS (the schedule's own choices are tested in test_costs.py)."""

from mlx_gemma_mtp.costs import Costs

ALWAYS_DRAFT = Costs([0.01] * 34, 1e-4, fixed=True)
# Drafting never pays: ``auto`` parks speculation (plain steps) from the first round.
NEVER_DRAFT = Costs([0.01] + [1.0] * 33, 1.0, fixed=True)
