"""The speculative engine: the loop (``loop``), how tokens are picked and drafts accepted
(``sampling``), the target's caches (``cache``) and the caches apps keep between turns
(``prompt_cache``)."""

from .loop import (
    DEFAULT_NUM_DRAFT_TOKENS,
    SCHEDULES,
    AutoSchedule,
    Block,
    DraftSchedule,
    SpeculativeGenerator,
    Stats,
    draft_slack,
    fresh_followed,
)

__all__ = [
    "DEFAULT_NUM_DRAFT_TOKENS",
    "SCHEDULES",
    "AutoSchedule",
    "Block",
    "DraftSchedule",
    "SpeculativeGenerator",
    "Stats",
    "draft_slack",
    "fresh_followed",
]
