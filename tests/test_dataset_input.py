"""Dataset objects as image input: a torch Dataset of (image, label) and a Hugging Face datasets.Dataset, read lazily."""

from __future__ import annotations

import io
import json
import weakref

import numpy as np
import pytest
import torch
from conftest import colour_images, missing, tiny_adapter
from PIL import Image

from prolip import (
    ImageLoadError,
    InputError,
    InputTypeError,
    MultiTaskClassifier,
    ProLIPSearch,
    ProLIPTipAdapter,
    SkippedImagesWarning,
    TestTimeProLIP,
    dataset_images,
)
from prolip.cli import main
from prolip.features.images import LazyImages, load_for_model

try:
    import datasets
except ImportError as exc:  # an optional extra; scripts/setup.sh installs it
    missing("datasets", str(exc))

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["red", "green", "blue"]


def _pil(images):
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


def _hf(images, labels, image_column="image", label_column="label"):
    """A datasets.Dataset of PNG-encoded images with a ClassLabel column (names: red, green, blue)."""
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict(
        {image_column: _pil(images), label_column: [NAMES.index(lab) for lab in labels]}, features=features
    )


class Pairs(torch.utils.data.Dataset):
    """A torch Dataset yielding (CHW uint8 tensor, label); item ``bad`` raises; counts the images alive at once."""

    def __init__(self, images, labels, bad=None):
        self.images, self.labels, self.bad = images, labels, bad
        self.alive = self.most_alive = self.reads = 0

    def __len__(self):
        return len(self.images)

    def _gone(self):
        self.alive -= 1

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError("disk read failed")
        self.reads += 1
        image = self.images[i].clone()  # a fresh object per read, as a dataset decoding a file gives
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(image, self._gone)
        return image, self.labels[i]


def test_hf_dataset_fits_like_the_list_and_names_classes_from_classlabel(checkpoints):
    images, labels = colour_images(3)
    ds = _hf(images, labels)
    from_list = tiny_adapter(checkpoints["vit"]).fit(images, labels)  # the class names as labels
    from_ds = tiny_adapter(checkpoints["vit"]).fit(ds)
    # Same pixels (PNG is lossless), same operations on the same shapes: bit-identical.
    assert torch.equal(from_ds.delta_, from_list.delta_)
    # The classes are the ClassLabel's names, not its ids: what predict returns and class folders are scored on.
    assert list(from_ds.classes_) == sorted(NAMES) and list(from_ds.class_names_) == sorted(NAMES)
    assert from_ds.fitted_.label_ids == {name: i for i, name in enumerate(NAMES)}  # the ids, kept in the file
    assert set(from_ds.predict(ds)) <= set(NAMES)
    np.testing.assert_array_equal(from_ds.predict_proba(ds), from_list.predict_proba(images))
    assert from_ds.score(ds) == from_list.score(images, labels)
    assert torch.equal(from_ds.extract_features(ds, views=0), from_list.extract_features(images, views=0))


def test_rows_without_a_label_are_left_out_and_counted(checkpoints):
    images, labels = colour_images(3)
    ids = [NAMES.index(lab) for lab in labels]
    ids[2] = ids[5] = -1  # datasets' "no label"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": _pil(images), "label": ids}, features=features)
    with pytest.warns(
        UserWarning, match=r"2 of 9 items .* have no label \(-1, None or NaN\): rows 2, 5; they are left out"
    ):
        adapter = tiny_adapter(checkpoints["vit"]).fit(ds)
    keep = [i for i in range(len(images)) if i not in (2, 5)]
    reference = tiny_adapter(checkpoints["vit"]).fit([images[i] for i in keep], [labels[i] for i in keep])
    assert torch.equal(adapter.delta_, reference.delta_) and list(adapter.classes_) == sorted(NAMES)


@pytest.mark.parametrize(("bad", "match"), [(None, "label 1 is None"), (float("nan"), "label 1 is nan"),
                                            (1, "labels '1' and 1 are different values that print the same")])  # fmt: skip
def test_labels_that_are_no_label_or_print_alike_are_refused(checkpoints, bad, match):
    images, _ = colour_images(1)
    labels = ["1", bad, "2"]
    with pytest.raises(InputError, match=match):
        tiny_adapter(checkpoints["vit"]).fit(images, labels)


def test_columns_are_configurable(checkpoints):
    images, labels = colour_images(2)
    ds = _hf(images, labels, image_column="picture", label_column="kind").add_column("other", [0] * len(images))
    with pytest.raises(InputError, match="no column 'photo'"):
        dataset_images(ds, image_column="photo")
    chosen = dataset_images(ds, image_column="picture", label_column="kind")
    assert chosen.labels() == [NAMES.index(lab) for lab in labels] and chosen.class_names == NAMES
    adapter = tiny_adapter(checkpoints["vit"], epochs=2).fit(chosen)
    assert list(adapter.class_names_) == sorted(NAMES) == list(adapter.classes_)
    plain = datasets.Dataset.from_dict({"pixels": _pil(images), "y": labels})  # an Image column, no ClassLabel
    with pytest.raises(InputError, match="label_column="):
        tiny_adapter(checkpoints["vit"]).fit(plain)


def test_torch_dataset_is_read_lazily_and_fits_like_the_list(checkpoints):
    images, labels = colour_images(4)
    pairs = Pairs(images, labels)
    loaded = load_for_model(pairs, on_error="raise")
    assert isinstance(loaded.images, LazyImages) and pairs.reads == 0  # nothing read before extraction asks
    adapter = tiny_adapter(checkpoints["vit"], batch_size=2).fit(pairs)
    # Never the whole dataset at once: at most a batch of images (and the one being read) is alive.
    assert pairs.most_alive <= 3 < len(images)
    reference = tiny_adapter(checkpoints["vit"], batch_size=2).fit(images, labels)
    assert torch.equal(adapter.delta_, reference.delta_)
    assert list(adapter.classes_) == ["blue", "green", "red"]
    np.testing.assert_array_equal(adapter.predict(pairs), reference.predict(images))


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_a_bad_item_is_named_by_its_index_and_skipped_on_request(kind, checkpoints):
    images, labels = colour_images(3)
    if kind == "torch":
        data = Pairs(images, labels, bad=4)
    else:
        encoded = [io.BytesIO() for _ in images]
        for im, buf in zip(_pil(images), encoded, strict=True):
            im.save(buf, format="PNG")
        raw = [{"bytes": buf.getvalue(), "path": None} for buf in encoded]
        raw[4] = {"bytes": b"not an image at all", "path": None}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
        data = datasets.Dataset.from_dict({"image": raw, "label": [NAMES.index(x) for x in labels]}, features=features)
    with pytest.raises(ImageLoadError, match="image 4 "):
        tiny_adapter(checkpoints["vit"]).fit(data)
    skipping = tiny_adapter(checkpoints["vit"], on_error="skip")
    with pytest.warns(SkippedImagesWarning, match="image 4"):
        skipping.fit(data)
    assert [s.index for s in skipping.skipped_] == [4]
    keep = [i for i in range(len(images)) if i != 4]
    reference = tiny_adapter(checkpoints["vit"]).fit([images[i] for i in keep], [labels[i] for i in keep])
    assert torch.equal(skipping.delta_, reference.delta_)
    with pytest.warns(SkippedImagesWarning):
        assert skipping.predict(data).shape == (len(images) - 1,)


def test_imagefolder_and_search_and_tip_adapter(checkpoints, tmp_path):
    images, labels = colour_images(3)
    for k, (im, lab) in enumerate(zip(_pil(images), labels, strict=True)):
        (tmp_path / lab).mkdir(exist_ok=True)
        im.save(tmp_path / lab / f"{k}.png")
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert sorted(ds.features["label"].names) == sorted(NAMES)
    adapter = tiny_adapter(checkpoints["vit"]).fit(ds)
    assert sorted(adapter.class_names_) == sorted(NAMES)

    search = ProLIPSearch(tiny_adapter(checkpoints["vit"]), lrs=[1e-2], reg_lambdas=[0.1, 1.0]).fit(ds, None, ds)
    assert search.score(ds) == search.best_estimator_.score(ds)
    tip = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"]), alpha=1.0, beta=1.0).fit(ds)
    assert 0.0 <= tip.score(ds) <= 1.0
    paths = [str(p) for p in sorted(tmp_path.rglob("*.png"))]
    assert paths == [row["image"].filename for row in ds]  # the same files in the same order
    tt = TestTimeProLIP(adapter, views=4, random_state=0)
    np.testing.assert_array_equal(tt.predict(ds), tt.predict(paths))
    tasks = MultiTaskClassifier({"colours": adapter})
    np.testing.assert_array_equal(tasks.predict(ds)["colours"], adapter.predict(paths))
    with pytest.raises(InputTypeError, match="labels must be a sequence"):
        tiny_adapter(checkpoints["vit"]).fit(images)


@pytest.mark.parametrize("layout", ["save_to_disk", "imagefolder"])
def test_cli_fit_reads_a_hf_dataset_folder(layout, checkpoints, tmp_path, capsys):
    images, labels = colour_images(3)
    folder = tmp_path / "data"
    if layout == "save_to_disk":
        _hf(images, labels).save_to_disk(str(folder))
    else:
        for k, (im, lab) in enumerate(zip(_pil(images), labels, strict=True)):
            (folder / lab).mkdir(parents=True, exist_ok=True)
            im.save(folder / lab / f"{k}.png")
    out = tmp_path / "delta.safetensors"
    argv = ["fit", "--hf-dataset", str(folder), "--model", "test-vit-tiny", "--pretrained", checkpoints["vit"]]
    argv += ["--views", "2", "--epochs", "3", "--shots", "2", "--out", str(out), "--device", "cpu", "-q"]
    assert main(argv) == 0
    from prolip import ProLIPAdapter

    loaded = ProLIPAdapter.load(out, pretrained=checkpoints["vit"], verbose=False)
    assert sorted(loaded.class_names_) == sorted(NAMES) and loaded.n_shots_ == 2
    assert main(["fit", str(folder), "--hf-dataset", str(folder), "--out", str(out)]) != 0
    assert "not both" in capsys.readouterr().err


def test_cli_a_classlabel_fit_predicts_names_and_evaluates_class_folders(checkpoints, tmp_path):
    from conftest import run_prolip

    images, labels = colour_images(3)
    splits = datasets.DatasetDict({"train": _hf(images[:6], labels[:6]), "holdout": _hf(images, labels)})
    splits.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "delta.safetensors"
    fit = ["fit", "--hf-dataset", str(tmp_path / "data"), "--split", "holdout", "--model", "test-vit-tiny",
           "--pretrained", checkpoints["vit"], "--views", "2", "--epochs", "3", "--out", str(out), "-q"]  # fmt: skip
    done = run_prolip(*fit)
    assert done.returncode == 0, done.stderr
    folders = tmp_path / "folders"
    for k, (im, lab) in enumerate(zip(_pil(images), labels, strict=True)):
        (folders / lab).mkdir(parents=True, exist_ok=True)
        im.save(folders / lab / f"{k}.png")
    load = ["--pretrained", checkpoints["vit"], "-q"]
    predicted = run_prolip("predict", str(out), str(folders / labels[0] / "0.png"), *load)
    assert predicted.returncode == 0 and predicted.stdout.split("\t")[1] in NAMES, predicted.stdout
    evaluated = run_prolip("eval", str(out), str(folders), *load)
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout, evaluated.stderr
    missing_split = run_prolip(*fit[:4], "nope", *fit[5:])
    assert missing_split.returncode == 1 and "has the splits ['train', 'holdout'], not 'nope'" in missing_split.stderr
    (tmp_path / "data" / "train" / "state.json").write_text("{not json")
    damaged = run_prolip(*fit[:4], "train", *fit[5:])
    assert damaged.returncode == 1 and damaged.stderr.count("\n") == 1 and "could not be read" in damaged.stderr


# A dataset from elsewhere (issue 29): prolip decodes its images, never fetches a URL, stays inside its folder.


def _png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_rows(paths):
    """A datasets.Dataset whose image column holds ``{"bytes": None, "path": p}`` for each p of ``paths``."""
    names = ["red", "green", "blue"]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
    rows = {"image": [{"bytes": None, "path": p} for p in paths], "label": [k % 3 for k in range(len(paths))]}
    return datasets.Dataset.from_dict(rows, features=features).cast_column("image", datasets.Image())


def _saved_dataset(tmp_path, paths):
    """A save_to_disk folder as an attacker writes it: ``Image`` entries with no bytes and any path.

    (``save_to_disk`` itself embeds local files' bytes, so the folder is written with a plain struct
    column and its ``dataset_info.json`` then declares the column an ``Image``.)
    """
    names = ["red", "green", "blue"]
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"image": struct, "label": datasets.ClassLabel(names=names)})
    rows = {"image": [{"bytes": None, "path": p} for p in paths], "label": [k % 3 for k in range(len(paths))]}
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    info = json.loads((folder / "dataset_info.json").read_text())
    info["features"]["image"] = {"_type": "Image"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


class _Server:
    """A local HTTP server counting the requests it gets (it serves a PNG, so a fetch would succeed)."""

    def __init__(self, body: bytes) -> None:
        import http.server
        import threading

        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                counter.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.requests = 0
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_saved_dataset_never_makes_prolip_fetch_a_url(checkpoints, tmp_path, capsys):
    from prolip.cli import main

    images, _ = colour_images(1)
    server = _Server(_png(images[0]))
    try:
        folder = _saved_dataset(tmp_path, [f"{server.url}/{k}.png" for k in range(3)])
        out = tmp_path / "delta.safetensors"
        argv = ["fit", "--hf-dataset", str(folder), "--model", "test-vit-tiny", "--pretrained", checkpoints["vit"]]
        argv += ["--views", "1", "--epochs", "1", "--out", str(out), "--device", "cpu", "-q"]
        capsys.readouterr()  # the folder's own writing
        assert main(argv) == 1
        assert server.requests == 0
        err = capsys.readouterr().err
        assert "URL" in err and err.count("\n") == 1 and not out.exists()
    finally:
        server.close()


def test_a_saved_datasets_paths_stay_inside_its_folder(checkpoints, tmp_path):
    from prolip.features.dataset_objects import load_hf_dataset

    images, _ = colour_images(1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for k, image in enumerate(images):
        (outside / f"{k}.png").write_bytes(_png(image))
    folder = _saved_dataset(tmp_path, [str(outside / f"{k}.png") for k in range(3)])
    data = load_hf_dataset(folder)
    with pytest.raises(ImageLoadError, match="outside"):
        data[0]
    # The same entries in a dataset object of the user's own: local files are the user's choice, URLs never are.
    from prolip import dataset_images
    from prolip.features.images import load_image

    own = dataset_images(datasets.load_from_disk(str(folder)))
    assert load_image(own[0]).shape == (3, 40, 40)
    with pytest.raises(ImageLoadError, match="URL"):
        dataset_images(_image_rows(["https://example.invalid/x.png", "hf://datasets/x/y.png"]))[1]
