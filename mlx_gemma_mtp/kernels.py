"""The Metal kernels of the centroid-masked lm_head, built with ``mx.fast.metal_kernel``.

Their sources live in the repository's top-level ``metal_kernels/`` folder: each ``<name>.metal``
file is the *body* of one kernel; MLX writes the signature from the input and output names below
(``write_signature`` in ``mlx/backend/common/metal_kernel.cpp``) and prepends ``centroid_head.h``
(plus its own utils) when it compiles the kernel on a Mac. A wheel installs that folder as
``mlx_gemma_mtp/metal_kernels/`` (package data), so a copied installed package carries it along.
"""

from functools import cache
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

HEADER = "centroid_head.h"
SOURCE_FOLDER = "metal_kernels"


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


def source_folders() -> list[Path]:
    """Where the sources may be, in order: inside the package (a wheel, or an installed package
    copied into an app), then beside it (the source tree, an editable install)."""
    package = Path(__file__).resolve().parent
    return [package / SOURCE_FOLDER, package.parent / SOURCE_FOLDER]


def source(filename: str) -> str:
    """The text of a kernel body or of the header."""
    for folder in source_folders():
        if (folder / filename).is_file():
            return (folder / filename).read_text()
    places = " or ".join(str(folder) for folder in source_folders())
    raise FileNotFoundError(f"Metal kernel source {filename} not found in {places}")


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
