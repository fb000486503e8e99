"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """``hf_pair(kind, target_class="causal")``: a tiny random transformers target/assistant pair
    saved with ``save_pretrained`` (``tests/hf_reference.py``), built once per session."""
    from hf_reference import make_pair  # torch and transformers load only where needed

    root = tmp_path_factory.mktemp("hf_pairs")
    pairs = {}

    def get(kind: str, target_class: str = "causal"):
        if (kind, target_class) not in pairs:
            pairs[kind, target_class] = make_pair(kind, root, target_class)
        return pairs[kind, target_class]

    return get
