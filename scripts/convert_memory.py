"""Peak resident memory of ``mlx_gemma_mtp.convert`` on a multi-shard random checkpoint.

Conversion must stream shard by shard: never hold the whole model. This script writes a random
Gemma 4 text target (bfloat16, split into shards of ``--shard-mb``), converts it in a fresh
process per setting (as is, cast to float16, quantized to 4 bits) and reads that process's peak
resident set size from the kernel (``wait4``). The target: peak <= 2 x the largest shard + 1 GB.

    python scripts/convert_memory.py [--layers 24 --hidden 2048 --shard-mb 400] [--json F]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1 << 30
SETTINGS = {
    "bfloat16 as is": [],
    "cast to float16": ["--dtype", "float16"],
    "quantized 4-bit": ["-q", "--q-bits", "4"],
}


def text_config(layers: int, hidden: int) -> dict:
    """``check``'s tiny text config, at a size whose shards are worth measuring."""
    from mlx_gemma_mtp.check import tiny_text_config

    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    return tiny_text_config(
        architectures=["Gemma4ForCausalLM"],
        dtype="bfloat16",
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        layer_types=[kinds[i % len(kinds)] for i in range(layers - 1)] + ["full_attention"],
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        num_kv_shared_layers=0,
        vocab_size=32768,
        sliding_window=512,
    )


def write_checkpoint(folder: Path, config: dict, shard_bytes: int) -> None:
    """A random checkpoint in shards of about ``shard_bytes``. Weights
    are made lazily and evaluated one shard at a time, so this process stays small too."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma4_text

    from mlx_gemma_mtp.config import normalize_target_config

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(normalize_target_config(config)))
    model.set_dtype(mx.bfloat16)
    shards, current = [], {}
    for name, weight in tree_flatten(model.parameters()):
        if current and sum(w.nbytes for w in current.values()) + weight.nbytes > shard_bytes:
            shards.append(current)
            current = {}
        current[name] = weight
    shards.append(current)
    del model
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / filename), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        shards[i] = None
        mx.clear_cache()
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def peak_rss_of(command: list[str]) -> tuple[int, float, int]:
    """Peak resident bytes, wall seconds and exit status of ``command``. (This process must stay
    small: a child started with vfork is charged its parent's peak until it runs ``exec``.)"""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.stderr.write(process.stderr.read().decode()[-3000:])
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale, time.perf_counter() - start, process.returncode


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> None:
    if sys.argv[1:2] == ["--write-checkpoint"]:  # in its own process, see peak_rss_of
        folder, config, shard_bytes = sys.argv[2:]
        write_checkpoint(Path(folder), json.loads(config), int(shard_bytes))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--shard-mb", type=int, default=400)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        source = root / "source"
        writer = [sys.executable, __file__, "--write-checkpoint", str(source)]
        config = json.dumps(text_config(args.layers, args.hidden))
        subprocess.run([*writer, config, str(args.shard_mb << 20)], check=True)
        sizes = [f.stat().st_size for f in source.glob("*.safetensors")]
        limit = 2 * max(sizes) + GB
        baseline, _, _ = peak_rss_of([sys.executable, "-c", "import mlx_gemma_mtp.convert"])
        report = {
            "checkpoint_gb": round(sum(sizes) / GB, 3),
            "shards": len(sizes),
            "largest_shard_gb": round(max(sizes) / GB, 3),
            "limit_gb": round(limit / GB, 3),
            "import_only_peak_gb": round(baseline / GB, 3),
            "settings": [],
        }
        print(json.dumps({k: v for k, v in report.items() if k != "settings"}), flush=True)
        for name in args.settings:
            out = root / "out"
            command = [sys.executable, "-m", "mlx_gemma_mtp.convert", "--hf-path", str(source)]
            peak, seconds, status = peak_rss_of([*command, "--mlx-path", str(out), *SETTINGS[name]])
            result = {
                "setting": name,
                "ok": status == 0,
                "peak_rss_gb": round(peak / GB, 3),
                "within_limit": peak <= limit,
                "output_gb": round(folder_bytes(out) / GB, 3) if out.exists() else None,
                "seconds": round(seconds, 1),
            }
            print(json.dumps(result), flush=True)
            report["settings"].append(result)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not all(s["ok"] and s["within_limit"] for s in report["settings"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
