"""Metal sources of the centroid-masked lm_head, loaded through ``mx.fast.metal_kernel``.

Each ``<name>.metal`` file is the *body* of one kernel; MLX writes the signature from the input and
output names below (``write_signature`` in ``mlx/backend/common/metal_kernel.cpp``) and prepends
``centroid_head.h`` (plus its own utils) when it compiles the kernel on a Mac.
"""

from functools import cache
from importlib import resources
from typing import NamedTuple

import mlx.core as mx

HEADER = "centroid_head.h"


class KernelSpec(NamedTuple):
    name: str  # MLX names the compiled kernel "custom_kernel_" + name + template and dtype suffixes
    source: str  # file holding the body
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


SPECS = {
    spec.source.removesuffix(".metal"): spec
    for spec in (
        KernelSpec(
            "gemma_mtp_centroid_scores",
            "centroid_scores.metal",
            ("hidden", "weight", "scales", "biases"),
            ("scores",),
        ),
        KernelSpec("gemma_mtp_centroid_topk", "centroid_topk.metal", ("scores",), ("selected",)),
        KernelSpec(
            "gemma_mtp_candidate_logits",
            "candidate_logits.metal",
            ("hidden", "weight", "scales", "biases", "selected", "token_ordering"),
            ("ids", "logits"),
        ),
    )
}


def source(filename: str) -> str:
    """The text of a file shipped in this package (a kernel body or the header)."""
    return resources.files(__name__).joinpath(filename).read_text()


@cache
def kernel(name: str):
    """The ``mx.fast.metal_kernel`` for ``SPECS[name]`` (built once, compiled on first use)."""
    spec = SPECS[name]
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=source(spec.source),
        header=source(HEADER),
    )
