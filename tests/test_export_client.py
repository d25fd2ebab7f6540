"""The reference client (numpy + PIL + onnxruntime, no torch) reproduces prolip predict from an exported file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import colour_images, missing, tiny_adapter
from PIL import Image

from prolip.features.images import load_image
from prolip.features.views import plain_views
from prolip.files.client import load_pixels

try:
    import onnxruntime  # noqa: F401
except ImportError as exc:  # scripts/setup.sh installs the export extra
    missing("prolip[export] (onnx, onnxruntime, onnxscript)", str(exc))

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def adapter(checkpoints):
    params = {"views": 2, "epochs": 30, "lr": 5e-2, "reg_lambda": 0.0}
    return tiny_adapter(checkpoints["vit"], "vit", **params).fit(*colour_images(2))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Image files a client meets: resized RGB of odd sizes, grayscale, RGBA, 16-bit, and a large JPEG (decoded at a
    reduced scale, as prolip does)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(4)

    def noise(h, w, c=3, top=256):
        return rng.integers(0, top, size=(h, w, c) if c else (h, w), dtype=np.uint16 if top > 256 else np.uint8)

    files = {
        "wide.png": Image.fromarray(noise(45, 61)),
        "tall.png": Image.fromarray(noise(97, 33)),
        "gray.png": Image.fromarray(noise(50, 50, 0), mode="L"),
        "rgba.png": Image.fromarray(noise(40, 52, 4), mode="RGBA"),
        "deep.png": Image.fromarray(noise(36, 40, 0, 65536).astype(np.uint16)),
        "photo.jpg": Image.fromarray(noise(520, 700)),
    }
    paths = []
    for name, image in files.items():
        image.save(root / name)
        paths.append(str(root / name))
    return paths


def test_the_reference_pixels_are_prolips_test_view(adapter, images):
    backbone = adapter.backbone
    prep = json.loads((adapter.export(images[0] + ".onnx", "onnx")[1]).read_text())["preprocessing"]
    for path in images:
        ours = plain_views([load_image(path, draft_size=backbone.draft_size)], backbone.view_config)[0].numpy()
        assert np.abs(load_pixels(path, prep) - ours).max() <= TOLERANCE, path


_CLIENT = """
import json, sys
from prolip.files.client import ExportedClassifier
classifier = ExportedClassifier(sys.argv[1])
proba = classifier.predict_proba(sys.argv[2:])
assert "torch" not in sys.modules, "the reference client imported torch"
print(json.dumps({"classes": classifier.classes, "proba": proba.tolist()}))
"""


@pytest.mark.slow
def test_a_client_without_torch_reproduces_prolip_predict(adapter, images, tmp_path):
    model, _ = adapter.export(tmp_path / "colours.onnx", "onnx")
    expected = adapter.predict_proba(images)
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, str(model), *images], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["classes"] == adapter.classes_.tolist()
    assert np.abs(np.asarray(out["proba"]) - expected).max() <= TOLERANCE


def test_a_mismatched_sidecar_is_refused(adapter, tmp_path):
    import onnx

    from prolip import InputError
    from prolip.files.client import ExportedClassifier

    model, sidecar = adapter.export(tmp_path / "m.onnx", "onnx")
    bare = onnx.load(str(model))
    del bare.metadata_props[:]  # a file without its description inside: the sidecar is read, and checked
    onnx.save(bare, str(model))
    with pytest.raises(InputError, match=r"describes another file than .*m\.onnx.*mismatched"):
        ExportedClassifier(model)
    described = json.loads(sidecar.read_text())
    described["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()  # the pair made consistent again
    sidecar.write_text(json.dumps(described))
    assert ExportedClassifier(model).classes == adapter.classes_.tolist()
