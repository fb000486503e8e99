"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """``hf_pair(kind, target_class="causal", **options)``: a tiny random transformers
    target/assistant pair saved with ``save_pretrained`` (``tests/hf_reference.py``, ``options``
    as ``make_pair`` takes them), built once per session."""
    from hf_reference import make_pair  # torch and transformers load only where needed

    root = tmp_path_factory.mktemp("hf_pairs")
    pairs = {}

    def get(kind: str, target_class: str = "causal", **options):
        key = (kind, target_class, *sorted(options.items()))
        if key not in pairs:
            pairs[key] = make_pair(kind, root, target_class, **options)
        return pairs[key]

    return get
