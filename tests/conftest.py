"""Shared fixtures."""

from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "gemma4-tiny"


@pytest.fixture(scope="module")
def fixture_pair():
    """The trained tiny target and assistant (``tests/fixtures/gemma4-tiny``), float32."""
    from mlx_gemma_mtp import load

    return load(str(FIXTURE / "target"), str(FIXTURE / "assistant"), dtype="float32")


def plain_greedy(target, prompt: list, max_tokens: int) -> list:
    """The reference tokens: mlx-lm's own greedy loop, fresh cache, whole token list as the
    prompt."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step  # loads transformers: only where it is used

    return [t for t, _ in generate_step(mx.array(prompt), target.model, max_tokens=max_tokens)]


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


@pytest.fixture(scope="session", autouse=True)
def costs_cache(tmp_path_factory):
    """The ``auto`` schedule's on-disk cost cache, in a folder of the test session's own."""
    import os

    folder = tmp_path_factory.mktemp("mtp_cache")
    previous = os.environ.get("MLX_GEMMA_MTP_CACHE_DIR")
    os.environ["MLX_GEMMA_MTP_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MLX_GEMMA_MTP_CACHE_DIR", None)
    else:
        os.environ["MLX_GEMMA_MTP_CACHE_DIR"] = previous
