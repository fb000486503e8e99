"""Images for the 12B's encoder-free vision embedder, preprocessed as transformers 5.23.0's
``Gemma4UnifiedImageProcessor`` does, with NumPy and Pillow instead of torch and torchvision.

That processor resizes (aspect preserved, sides multiples of ``patch_size * pooling_kernel_size``)
with torchvision's antialiased bicubic filter on the uint8 image, which on the CPU is torch's
integer resampler (``UpSampleKernel.cpp``: int16 weights, separable, width first, each pass
rounded to uint8): ``resize_bicubic`` is that algorithm, pixel for pixel. It then rescales to
[0, 1], cuts ``patch_size`` patches and merges each ``pooling_kernel_size``² block into one model
patch, which is the same as cutting ``patch_size * pooling_kernel_size`` patches directly (rows,
then columns, then RGB inside a patch; patches in row-major order, positions (x, y)).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError
from .models.gemma4_unified_vision import UnifiedVisionArgs

BICUBIC = 3  # PIL's (and transformers' PILImageResampling) number for the bicubic filter
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # what Gemma4UnifiedImageProcessor accepts
DEFAULT_MAX_SOFT_TOKENS = 280
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
KEYS_CUBIC = -0.5  # the cubic's ``a`` with antialiasing (PIL's, not OpenCV's -0.75)
MAX_PRECISION_BITS = 22


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, with torch's operations in torch's order (the int16
    weights must round exactly as torch rounds them)."""
    a, x = KEYS_CUBIC, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(first input index [out], int16-valued weights [out, taps], precision bits)`` of
    torch's antialiased bicubic resampling along one axis (``_compute_indices_min_size_weights_aa``
    and ``_compute_index_ranges_int16_weights``, align_corners False, no scale factor)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    # C++'s int64 casts truncate toward zero
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    count = np.clip(last - first, 0, taps)
    j = np.arange(taps)
    weights = cubic(((first[:, None] + j) - center[:, None] + 0.5) * inv_scale)
    weights = np.where(j < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # in order, as the C++ loop adds them
        total += weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    largest, precision = weights.max(), 0
    while precision < MAX_PRECISION_BITS and int(0.5 + largest * (2 << precision)) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return first, np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int32), precision


def resize_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    first, weights, precision = axis_weights(in_size, out_size)
    source = np.ascontiguousarray(np.moveaxis(pixels, axis, 0))  # whole rows to gather
    shape = (-1,) + (1,) * (source.ndim - 1)
    total = np.full((out_size, *source.shape[1:]), 1 << (precision - 1), np.int32)
    term = np.empty_like(total)
    for tap in range(weights.shape[1]):  # zero weights past each output's taps
        rows = source[np.minimum(first + tap, in_size - 1)]
        total += np.multiply(rows, weights[:, tap].reshape(shape), out=term)
    return np.moveaxis(np.clip(total >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """An [H, W, C] uint8 image resized to [height, width, C] as torchvision resizes a uint8
    tensor on the CPU (``interpolation=BICUBIC, antialias=True``)."""
    return resize_axis(resize_axis(pixels, width, 1), height, 0)


@dataclass
class UnifiedImageProcessor:
    """The settings of the checkpoint's ``Gemma4UnifiedImageProcessor`` and what it does with
    them: ``__call__(image)`` gives ``(patches [N, (k·p)²·3] float32 in [0, 1], positions [N, 2]
    (x, y), N)`` for one RGB image, N being its number of soft tokens."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS
    rescale_factor: float = 1 / 255

    @classmethod
    def from_folder(cls, model_path: Path, args: UnifiedVisionArgs) -> "UnifiedImageProcessor":
        """The checkpoint's processor settings (the class's defaults for what its file leaves
        out; the embedder's patch sizes without a file), checked against the embedder."""
        defaults = cls()
        embedder = cls(patch_size=args.patch_size, pooling_kernel_size=args.pooling_kernel_size)
        files = [model_path / name for name in PROCESSOR_FILES if (model_path / name).exists()]
        if not files:
            processor, source = embedder, model_path / "config.json"
        else:
            from transformers.image_processing_base import ImageProcessingMixin

            saved, _ = ImageProcessingMixin.get_image_processor_dict(model_path)
            source = files[0]
            check_supported(saved, source)
            rescale = saved.get("do_rescale", True)
            processor = cls(
                patch_size=saved.get("patch_size", defaults.patch_size),
                pooling_kernel_size=saved.get("pooling_kernel_size", defaults.pooling_kernel_size),
                max_soft_tokens=saved.get("max_soft_tokens", defaults.max_soft_tokens),
                rescale_factor=saved.get("rescale_factor", defaults.rescale_factor)
                if rescale
                else 1.0,
            )
        processor.check(embedder.model_patch_size, args.mm_posemb_size, source)
        return processor

    def check(self, model_patch_size: int, table_size: int, source: Path) -> None:
        """What the embedder can take: its patch size, positions inside its table."""
        if self.model_patch_size != model_patch_size:
            raise ConfigError(
                f"{source}: {self.patch_size}-pixel patches merged {self.pooling_kernel_size} x "
                f"{self.pooling_kernel_size} make {self.model_patch_size}-pixel ones, but "
                f"config.json's vision embedder takes {model_patch_size}-pixel patches"
            )
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ConfigError(
                f"{source}: max_soft_tokens {self.max_soft_tokens} (expected one of "
                f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))})"
            )
        if self.max_soft_tokens > table_size:  # an image can be that many patches wide
            raise ConfigError(
                f"{source}: max_soft_tokens {self.max_soft_tokens} allows patch positions "
                f"beyond config.json's vision mm_posemb_size {table_size}"
            )

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray, int]:
        from transformers.models.gemma4_unified.processing_gemma4_unified import (
            get_aspect_ratio_preserving_size,
        )

        k, side = self.pooling_kernel_size, self.model_patch_size
        height, width = get_aspect_ratio_preserving_size(
            height=image.height,
            width=image.width,
            patch_size=self.patch_size,
            max_patches=self.max_soft_tokens * k * k,
            pooling_kernel_size=k,
        )
        pixels = resize_bicubic(np.asarray(image, dtype=np.uint8), height, width)
        pixels = pixels.astype(np.float32) * np.float32(self.rescale_factor)
        rows, columns = height // side, width // side
        patches = pixels.reshape(rows, side, columns, side, 3).transpose(0, 2, 1, 3, 4)
        y, x = np.divmod(np.arange(rows * columns), columns)
        return patches.reshape(rows * columns, -1), np.stack([x, y], axis=-1), rows * columns


def check_supported(settings: dict, source: Path) -> None:
    """The image processor settings we implement; the 12B's own are these."""
    unsupported = {
        "do_resize": settings.get("do_resize", True) is not True,
        "resample": settings.get("resample", BICUBIC) != BICUBIC,
        "do_normalize": bool(settings.get("do_normalize", False)),
    }
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(
                f"{source}: {key} {settings[key]!r} is not supported for the 12B's images "
                "(expected do_resize true, resample 3 (bicubic), do_normalize false)"
            )
