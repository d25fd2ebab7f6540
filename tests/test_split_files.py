"""Hostile split, id and draw files: labels bounded by the classes, nesting and huge integers one clear error,
and every item kept inside its dataset's folder."""

from __future__ import annotations

import json
import re
import tracemalloc

import pytest

from prolip.bench.data import Dataset, Item, draw_shots, read_coop, read_draw, write_draw
from prolip.errors import InputError


def dtd(root, train=None, text=None):
    folder = root / "dtd"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    good = [["a.jpg", 0, "bumpy"], ["b.jpg", 1, "dotted"]]
    split = {"train": train if train is not None else good, "val": good, "test": good}
    (folder / "split_zhou_DescribableTextures.json").write_text(text if text is not None else json.dumps(split))
    return root


def test_a_well_formed_split_reads(tmp_path):
    dataset = read_coop("dtd", dtd(tmp_path))
    assert dataset.classnames == ("bumpy", "dotted") and dataset.train[0].path == str(tmp_path / "dtd/images/a.jpg")


def test_a_huge_label_is_refused_without_building_its_range(tmp_path):
    tracemalloc.start()
    with pytest.raises(InputError, match=r"10000000000.* is out of range"):
        read_coop("dtd", dtd(tmp_path, train=[["a.jpg", 10**12, "x"], ["b.jpg", 0, "bumpy"]]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20


@pytest.mark.parametrize(
    ("text", "fault"),
    [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ('{"train": [["a.jpg", 1' + "0" * 5000 + "]]}", "digits")],
)
def test_hostile_json_is_one_clear_error(tmp_path, text, fault):
    with pytest.raises(InputError, match=fault) as info:
        read_coop("dtd", dtd(tmp_path, text=text))
    assert "split_zhou_DescribableTextures.json" in str(info.value)


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../outside.png", "sub/../../x.png", "..\\..\\x.png"])
def test_split_entries_outside_the_dataset_folder_are_refused(tmp_path, entry):
    with pytest.raises(InputError, match=r"train\[0\]: image path .* is not inside the dataset folder"):
        read_coop("dtd", dtd(tmp_path, train=[[entry, 0, "bumpy"], ["b.jpg", 1, "dotted"]]))


def test_fgvc_ids_outside_the_dataset_folder_are_refused(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("707-320\nA300\n")
    for split in ("train", "val", "test"):
        (folder / f"images_variant_{split}.txt").write_text("0001 707-320\n0002 A300\n")
    assert len(read_coop("fgvc_aircraft", tmp_path).train) == 2
    (folder / "images_variant_val.txt").write_text("0001 707-320\n../../../secret A300\n")
    with pytest.raises(InputError, match=re.escape("images_variant_val.txt' line 2: image path '../../../secret.jpg'")):
        read_coop("fgvc_aircraft", tmp_path)


def test_draw_files_cannot_point_outside_the_dataset(tmp_path):
    root = tmp_path / "d"
    items = tuple(Item(str(root / f"{i}.png"), i % 2, "ab"[i % 2]) for i in range(4))
    dataset = Dataset("d", root, ("a", "b"), ("a {}.",), train=items, val=(), test=items)
    path = tmp_path / "draw.json"
    write_draw(draw_shots(dataset, 1, 1), path, dataset)
    assert read_draw(path, dataset).items == draw_shots(dataset, 1, 1).items
    record = json.loads(path.read_text())
    record["items"][0][0] = "../elsewhere.png"
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=re.escape("item 0: image path '../elsewhere.png' is not inside")):
        read_draw(path, dataset)


def test_empty_class_names_are_refused(tmp_path):
    with pytest.raises(InputError, match="class 1 has an empty name"):
        entries = [["a.jpg", 0, "bumpy"], ["b.jpg", 1, " "]]
        read_coop("dtd", dtd(tmp_path, text=json.dumps({"train": entries, "val": entries, "test": entries})))
    folder = tmp_path / "imagenet"
    from PIL import Image

    for wnid in ("n01", "n02"):
        for split in ("train", "val"):
            (folder / "images" / split / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "images" / split / wnid / "x.png")
    (folder / "classnames.txt").write_text("n01 tench\nn02 \n")
    with pytest.raises(InputError, match="empty name"):
        read_coop("imagenet", tmp_path)


def test_float_tiffs_in_0_1_are_scaled_and_nan_pixels_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from prolip.errors import ImageLoadError
    from prolip.features.images import load_image

    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(pixels, mode="F").save(tmp_path / "f.tiff")
    from_file = load_image(str(tmp_path / "f.tiff"))
    assert from_file.max() == 255 and bool((from_file == load_image(np.repeat(pixels[..., None], 3, -1))).all())
    pixels[2, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(ImageLoadError, match="NaN or Inf pixels"):
        load_image(str(tmp_path / "nan.tiff"))
