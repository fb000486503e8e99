"""Write a tiny random Gemma 4 12B-style ("unified") pair with transformers, in the layout Google
publishes: ``OUT/target`` (``Gemma4UnifiedForConditionalGeneration``, model_type
``gemma4_unified``, with its image and audio embedders and ``preprocessor_config.json``),
``OUT/assistant`` (``Gemma4UnifiedAssistantForCausalLM``, model_type
``gemma4_unified_assistant``) and a random picture ``OUT/picture.png``.

The weights are random (the parity tests' ``tests/hf_multimodal.py``), so the text is noise; the
point is to run the convert and generate commands end to end on a local folder. Needs the test
extras (``pip install -e ".[test]"``: torch, transformers, Pillow), no network.

    python scripts/make_tiny_unified_pair.py --out tiny-12b
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_multimodal import make_unified_image_pair, random_images  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--sliding-window", type=int, default=8)
    parser.add_argument("--ordered", action="store_true", help="centroid-masked drafter head")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} already exists")
    with tempfile.TemporaryDirectory() as tmp:
        options = dict(sliding_window=args.sliding_window, ordered=args.ordered)
        target, assistant = make_unified_image_pair(Path(tmp), **options)
        (picture,) = random_images(Path(tmp), [(64, 48)])
        out.mkdir(parents=True)
        shutil.move(target, out / "target")
        shutil.move(assistant, out / "assistant")
        shutil.move(picture, out / "picture.png")
    print(f"Wrote {out}/target, {out}/assistant and {out}/picture.png")
    return out


if __name__ == "__main__":
    main()
