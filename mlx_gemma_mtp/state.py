"""What the engine keeps per (target, drafter) pair between generations, owned by the package:
nothing is written onto the caller's model objects.

Entries are keyed by the pair's identities and dropped when either model is garbage collected
(neither is kept alive from here: compiled steps hold weak proxies). Each table keeps its
``MAX_KINDS`` most recently used entries: a kind is a kind of policy (greedy, coupled sampling
with which filters, ...), never a value such as a temperature, so a server that sees every
temperature compiles and measures a bounded number of steps.
"""

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MAX_KINDS = 8


class BoundedTable:
    """A thread-safe table of at most ``size`` entries, least recently used dropped first."""

    def __init__(self, size: int = MAX_KINDS):
        self.size, self.entries, self.lock = size, OrderedDict(), threading.RLock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry for ``key``, made by ``make()`` the first time (under the lock: two threads
        asking at once make it once)."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
            return self.put(key, make())

    def put(self, key: Hashable, value: Any) -> Any:
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self.entries)


class PairState:
    """Per pair: compiled draft steps per kind of policy, costs per kind, and what ``auto``
    followed (round times and acceptance) per kind and draft limit."""

    def __init__(self):
        self.steps = BoundedTable()
        self.costs = BoundedTable()
        self.followed = BoundedTable()


_lock = threading.Lock()
_kept: dict[tuple, Any] = {}


def kept_for(kind: str, make: Callable[[], Any], *owners) -> Any:
    """The package's ``kind`` of state for ``owners`` (a pair's ``PairState``, an mlx-lm model's
    ``Target``, a centroid head's buffers), made by ``make()`` once while they all live and
    dropped when any of them goes. Nothing is set on the owners; what ``make`` returns must not
    keep them alive (hold weak proxies, if any)."""
    key = (kind, *map(id, owners))
    with _lock:
        value = _kept.get(key)
        if value is None:
            value = _kept[key] = make()
            for owner in owners:
                weakref.finalize(owner, _drop, key, value)
        return value


def _drop(key: tuple, value: Any) -> None:
    with _lock:
        if _kept.get(key) is value:  # not newer state of owners that reuse the ids
            del _kept[key]


def pair_state(target_model, drafter) -> PairState:
    """The state of the pair (made on first use)."""
    return kept_for("pair", PairState, target_model, drafter)


def live_states() -> int:
    """How many pairs and owners have state (for tests)."""
    with _lock:
        return len(_kept)
