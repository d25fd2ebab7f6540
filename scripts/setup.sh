#!/usr/bin/env bash
# Set up everything prolip needs on a fresh machine: a virtual environment in .venv with the
# package and its test/example extras, and the Fashion-MNIST images used by the offline demo.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import prolip, torch, torchvision, open_clip, pytest, hypothesis, matplotlib, huggingface_hub, jinja2, mkdocstrings, sklearn, importlinter, datasets, transformers, onnx, onnxruntime, onnxscript" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    # These torch/torchvision builds import together (PyPI's torchvision does not import beside
    # other torch builds); on these machines pip takes them from local disk.
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip install -q -e ".[test,examples,bench,plot,hub,docs,export,datasets,transformers]"
fi

# Fashion-MNIST: Debian's package on Debian/Ubuntu machines; elsewhere torchvision downloads it
# on first use (examples pass --download).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "setup: could not install dataset-fashion-mnist; the demo will try torchvision's download."
fi
