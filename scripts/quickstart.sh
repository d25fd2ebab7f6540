#!/usr/bin/env bash
# The offline quickstart: set up, then fit ProLIP on 16 shots per class of upside-down
# Fashion-MNIST with the packaged stand-in CLIP. Extra arguments go to examples/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} .venv/bin/python examples/quickstart.py "$@"
