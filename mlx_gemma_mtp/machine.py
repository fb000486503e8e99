"""What this machine is, as far as decoding speed is concerned: processor, MLX device and the BLAS
MLX's CPU matmuls use (the Linux wheel bundles the slow netlib reference BLAS; an optimized one can
be preloaded)."""

import os
import platform
import subprocess
from functools import cache
from pathlib import Path

import mlx.core as mx


# The probes are cached: the hardware does not change within a process, and speed_identity is
# asked at every generation (on macOS cpu_model runs a sysctl subprocess).
@cache
def cpu_model() -> str:
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def gpu_name() -> str | None:
    """The Metal device's name on a Mac (None elsewhere)."""
    try:
        if mx.metal.is_available():
            return str(mx.metal.device_info().get("device_name"))
    except Exception:  # device_info is best effort
        return None
    return None


@cache
def blas_library() -> str:
    """Which BLAS MLX's CPU float32 matmuls use: the MLX Linux wheel bundles the reference
    (netlib) BLAS in ``mlx_cpu.libs``; an optimized one can be preloaded (scripts/README.md)."""
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "blas" in p.lower()]
    if preload:
        return f"preloaded {Path(preload[0]).name} ({preload[0]})"
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.split()[-1] for line in f if "mlx_cpu.libs" in line}
    except OSError:
        mapped = set()
    bundled = sorted(Path(p).name for p in mapped if Path(p).name.startswith("libblas"))
    if bundled:
        return f"reference BLAS bundled with the MLX wheel ({bundled[0]})"
    if platform.system() == "Darwin":
        return "Accelerate"
    return "unknown"


def speed_identity() -> dict:
    """Everything about this machine that changes what a forward costs."""
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_model(),
        "gpu": gpu_name(),
        "blas": blas_library(),
        "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
