"""Use real open_clip weights offline, from a checkpoint file on disk.

On a machine without internet, download the weights once elsewhere (for example open_clip's
``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors`` from the model's Hub page), copy
the file over, and pass its path as ``pretrained``. prolip loads it with ``weights_only=True``
(or as safetensors), so nothing is unpickled:

    HF_HUB_OFFLINE=1 python examples/offline_checkpoint.py --model ViT-B-32 \\
        --pretrained /models/ViT-B-32/open_clip_model.safetensors

Without arguments it uses the packaged stand-in's checkpoint file the same way, as a file path.
The delta records the model name and the path; on another machine, load it with
``ProLIPAdapter.load(delta, pretrained="/their/path/to/the/same/weights")`` and the W0
fingerprint check confirms the weights are the same.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prolip import ProLIPAdapter, standin
from prolip.datasets import export_image_folder
from prolip.datasets.generic import read_labelled


def main() -> None:
    """Fit with weights from a local file, save, and reload onto the same file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=standin.MODEL_NAME, help="open_clip model name")
    parser.add_argument("--pretrained", default=str(standin.checkpoint_path()), help="checkpoint file")
    args = parser.parse_args()
    if not Path(args.pretrained).is_file():
        raise SystemExit(f"{args.pretrained} is not a file: pass the path of a downloaded open_clip checkpoint")

    with tempfile.TemporaryDirectory() as tmp:
        paths, labels = read_labelled(export_image_folder(Path(tmp) / "train", "train", per_class=4))
        templates = standin.TEMPLATES if args.model == standin.MODEL_NAME else None
        adapter = ProLIPAdapter(args.model, args.pretrained, templates=templates, views=30).fit(paths, labels)
        delta = Path(tmp) / "delta.safetensors"
        adapter.save(delta)
        reloaded = ProLIPAdapter.load(delta, pretrained=args.pretrained)
        print(f"base weights: {args.pretrained}")
        print(f"base model fingerprint: {reloaded.base_fingerprint_.summary()}")
        print(f"reloaded predictions match: {(reloaded.predict(paths) == adapter.predict(paths)).all()}")


if __name__ == "__main__":
    main()
