"""Write a tiny random Gemma 4 E2B-style pair with image and audio encoders, with transformers:
``OUT/target`` (``Gemma4ForConditionalGeneration`` with vision and audio towers, per-layer inputs,
bidirectional attention inside image blocks), ``OUT/assistant``, a random picture
``OUT/picture.png`` and a 1-second 16 kHz clip ``OUT/clip.wav``.

The weights are random (the parity tests' ``tests/hf_multimodal.py``), so the text is noise; the
point is to run the convert and generate commands end to end on a local folder. Needs the test
extras (``pip install -e ".[test]"``: torch, transformers, Pillow), no network.

    python scripts/make_tiny_multimodal_pair.py --out tiny-e2b
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_multimodal import make_multimodal_pair, random_clips, random_images  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} already exists")
    with tempfile.TemporaryDirectory() as tmp:
        target, assistant = make_multimodal_pair(Path(tmp), bidirectional=True)
        (picture,) = random_images(Path(tmp), [(64, 48)])
        (clip,) = random_clips(Path(tmp), [1.0])
        out.mkdir(parents=True)
        shutil.move(target, out / "target")
        shutil.move(assistant, out / "assistant")
        shutil.move(picture, out / "picture.png")
        shutil.move(clip, out / "clip.wav")
    print(f"Wrote {out}/target, {out}/assistant, {out}/picture.png and {out}/clip.wav")
    return out


if __name__ == "__main__":
    main()
