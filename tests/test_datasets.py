"""Dataset readers (CoOp layout and generic), few-shot draws, base-to-new split, and the miniature suite.

Every CoOp-layout tree here is written by the tests from CoOp's DATASETS.md; images are empty
files, since the readers never open them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from prolip.bench.data import (
    COOP_DATASETS,
    COOP_LAYOUTS,
    IMAGENET_TEMPLATES,
    IMAGENET_VARIANTS,
    Dataset,
    Item,
    base_new_split,
    draw_shots,
    draw_validation,
    read_coop,
    read_dataset,
    read_draw,
    read_image_dataset,
    select_classes,
    write_draw,
)
from prolip.datasets import read_templates
from prolip.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def write_split_json(root: Path, folder: str, images: str, split_file: str, classes: list[str], n: int = 4) -> None:
    """A split_zhou dataset: ``n`` train, 2 val and 3 test images per class, paths under ``images``."""
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        for part, count in (("train", n), ("val", 2), ("test", 3)):
            for i in range(count):
                rel = f"{name.replace(' ', '_')}/{part}_{i}.jpg"
                touch(root / folder / images / rel)
                split[part].append([rel, label, name])
    (root / folder / split_file).write_text(json.dumps(split))


def write_aircraft(root: Path) -> None:
    """FGVC-Aircraft's own layout: variants.txt and images_variant_<split>.txt, images/<id>.jpg."""
    folder = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    image_id = 1000000
    for part in ("train", "val", "test"):
        lines = []
        for variant in variants:
            for _ in range(3):
                image_id += 1
                touch(folder / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}\n")
        (folder / f"images_variant_{part}.txt").write_text("".join(lines))


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n01491361": "tiger shark"}


def write_imagenet(root: Path) -> None:
    """ImageNet's folders (3 train, 2 val images per class) and classnames.txt in wnid order."""
    folder = root / "imagenet"
    for wnid in WNIDS:
        for i in range(3):
            touch(folder / "images" / "train" / wnid / f"{wnid}_{i}.JPEG")
        for i in range(2):
            touch(folder / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG")
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in WNIDS.items()))


# ---------------------------------------------------------------------------- CoOp readers
def test_split_json_reader(tmp_path):
    write_split_json(
        tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json", ["abyssinian", "pug", "shiba inu"]
    )
    ds = read_coop("oxford_pets", tmp_path)
    assert ds.name == "oxford_pets"
    assert ds.classnames == ("abyssinian", "pug", "shiba inu")
    assert ds.templates == ("a photo of a {}, a type of pet.",)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 6, 9)
    first = ds.train[0]
    assert first == Item(str(tmp_path / "oxford_pets" / "images" / "abyssinian" / "train_0.jpg"), 0, "abyssinian")
    assert all(Path(item.path).is_file() for item in ds.train + ds.val + ds.test)
    assert ds.relative_path(first.path) == "images/abyssinian/train_0.jpg"


def test_split_json_reader_with_images_in_the_dataset_folder(tmp_path):
    write_split_json(tmp_path, "stanford_cars", "", "split_zhou_StanfordCars.json", ["audi a4", "bmw m3"])
    ds = read_coop("stanford_cars", tmp_path)
    assert ds.train[0].path == str(tmp_path / "stanford_cars" / "audi_a4" / "train_0.jpg")
    assert ds.templates == ("a photo of a {}.",)


def test_aircraft_reader(tmp_path):
    write_aircraft(tmp_path)
    ds = read_coop("fgvc_aircraft", tmp_path)
    assert ds.classnames == ("707-320", "A300B4", "Cessna 172")
    assert ds.templates == ("a photo of a {}, a type of aircraft.",)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 9, 9)
    assert ds.test[-1] == Item(str(tmp_path / "fgvc_aircraft" / "images" / "1000027.jpg"), 2, "Cessna 172")


def test_imagenet_reader(tmp_path):
    write_imagenet(tmp_path)
    ds = read_coop("imagenet", tmp_path)
    assert ds.classnames == tuple(WNIDS.values())
    assert ds.class_ids == tuple(WNIDS)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 0, 8)  # CoOp: no val; test = ImageNet's val
    assert {Path(item.path).parent.name for item in ds.test if item.label == 1} == {"n01443537"}
    assert all("/images/val/" in Path(item.path).as_posix() for item in ds.test)


def test_the_imagenet_family_reads_with_the_official_seven_templates(tmp_path):
    """ProLIP's datasets/imagenet.py (and its -V2, -Sketch, -A, -R copies): 7 templates for every method."""
    write_imagenet(tmp_path)
    touch(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "0" / "x.jpeg")
    for folder in ("imagenet-sketch/images", "imagenet-adversarial/imagenet-a", "imagenet-rendition/imagenet-r"):
        touch(tmp_path / folder / "n01440764" / "0.jpg")
    seven = (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    )  # fmt: skip
    assert seven == IMAGENET_TEMPLATES
    for name in ("imagenet", *IMAGENET_VARIANTS):
        assert read_coop(name, tmp_path).templates == seven, name
    assert COOP_LAYOUTS["imagenet"].template == "a photo of a {}."  # CoOp's own prompt stays on record


def test_imagenet_a_reads_a_subset_with_imagenet_names(tmp_path):
    write_imagenet(tmp_path)
    for wnid in ("n01491361", "n01443537"):  # out of order on purpose: labels follow sorted wnids
        touch(tmp_path / "imagenet-adversarial" / "imagenet-a" / wnid / "0.jpg")
    (tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("ignored")
    ds = read_coop("imagenet_a", tmp_path)  # no classnames.txt copy: ImageNet's is used
    assert ds.classnames == ("goldfish", "tiger shark")
    assert ds.class_ids == ("n01443537", "n01491361")
    assert [item.label for item in ds.test] == [0, 1]
    assert ds.train == ds.val == ()
    imagenet = read_coop("imagenet", tmp_path)
    assert [imagenet.class_ids.index(w) for w in ds.class_ids] == [1, 3]


def test_imagenet_variant_prefers_its_own_classnames_copy(tmp_path):
    touch(tmp_path / "imagenet-rendition" / "imagenet-r" / "n01440764" / "a.png")
    (tmp_path / "imagenet-rendition" / "classnames.txt").write_text("n01440764 tench fish\n")
    assert read_coop("imagenet_r", tmp_path).classnames == ("tench fish",)


def test_imagenetv2_folders_are_imagenet_labels(tmp_path):
    write_imagenet(tmp_path)
    for label in (0, 3):
        touch(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "x.jpeg")
    ds = read_coop("imagenetv2", tmp_path)
    assert ds.classnames == tuple(WNIDS.values())
    assert [(item.label, item.classname) for item in ds.test] == [(0, "tench"), (3, "tiger shark")]


@pytest.mark.parametrize("name", COOP_DATASETS)
def test_missing_dataset_gives_one_error_naming_the_layout(tmp_path, name):
    with pytest.raises(InputError) as info:
        read_coop(name, tmp_path)
    message = str(info.value)
    assert "docs/datasets.md" in message
    assert str(tmp_path / COOP_LAYOUTS[name].folder) in message
    if COOP_LAYOUTS[name].split_file:
        assert COOP_LAYOUTS[name].split_file in message


def test_missing_split_file_is_named_alone(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match=r"Missing: file .*split_zhou_DescribableTextures\.json\. See"):
        read_coop("dtd", tmp_path)


def test_missing_aircraft_split_file_and_classnames_everywhere(tmp_path):
    write_aircraft(tmp_path)
    (tmp_path / "fgvc_aircraft" / "images_variant_val.txt").unlink()
    with pytest.raises(InputError, match=r"Missing: file .*images_variant_val\.txt\. See"):
        read_coop("fgvc_aircraft", tmp_path)
    (tmp_path / "imagenet-sketch" / "images" / "n01440764").mkdir(parents=True)
    with pytest.raises(InputError) as info:
        read_coop("imagenet_sketch", tmp_path)
    assert str(tmp_path / "imagenet-sketch" / "classnames.txt") in str(info.value)
    assert str(tmp_path / "imagenet" / "classnames.txt") in str(info.value)


def test_malformed_split_files(tmp_path):
    write_split_json(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", ["Forest", "River"])
    path = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    split = json.loads(path.read_text())
    split["test"][0] = ["Forest/x.jpg", "0", "Forest"]
    path.write_text(json.dumps(split))
    with pytest.raises(InputError, match=r"test\[0\]"):
        read_coop("eurosat", tmp_path)
    split["test"][0] = ["Forest/x.jpg", 1, "Forest"]  # label 1 is "River" elsewhere
    path.write_text(json.dumps(split))
    with pytest.raises(InputError, match="called both"):
        read_coop("eurosat", tmp_path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot read the split file"):
        read_coop("eurosat", tmp_path)
    write_aircraft(tmp_path)
    with (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").open("a") as f:
        f.write("1999999 Boeing 747\n")
    with pytest.raises(InputError, match=r"line 10: variant 'Boeing 747'"):
        read_coop("fgvc_aircraft", tmp_path)


def test_dataset_checks_its_items(tmp_path):
    with pytest.raises(InputError, match="does not match"):
        Dataset("x", tmp_path, ("a", "b"), ("{}",), train=(Item("p", 1, "a"),))
    with pytest.raises(InputError, match="does not match"):
        Dataset("x", tmp_path, ("a", "b"), ("{}",), test=(Item("p", 2, "c"),))
    with pytest.raises(InputError, match="exactly one"):
        Dataset("x", tmp_path, ("a",), ("no slot",))


# ---------------------------------------------------------------------------- draws
def toy(root: Path, per_class: dict[str, int], val: int = 0) -> Dataset:
    """Classes c0, c1, ... with paths root/images/<class>/img<i>.png (train) and .../val<i>.png (val)."""

    def items(stem: str, count_of) -> tuple[Item, ...]:
        return tuple(
            Item(str(root / "images" / c / f"{stem}{i}.png"), label, c)
            for label, (c, n) in enumerate(per_class.items())
            for i in range(count_of(n))
        )

    return Dataset("toy", root, tuple(per_class), ("a photo of a {}.",), items("img", int), items("val", lambda n: val))


def reference_draw(dataset: Dataset, split: str, seed: int, start: int, stop: int) -> list[Item]:
    """The documented rule, written independently: rank by sha256("<seed>\\0<relative path>")."""
    chosen = []
    for label in range(dataset.num_classes):
        members = [item for item in getattr(dataset, split) if item.label == label]
        key = {item: Path(item.path).relative_to(dataset.root).as_posix() for item in members}
        members.sort(key=lambda item: hashlib.sha256(f"{seed}\x00{key[item]}".encode()).hexdigest())
        chosen += members[start:stop]
    return chosen


def test_draw_matches_values_pinned_with_coreutils(tmp_path):
    # Pinned with `printf '7\0images/c0/img4.png' | sha256sum` etc. (GNU coreutils), not with Python.
    ds = toy(tmp_path, {"c0": 6, "c1": 6})
    rel = [ds.relative_path(p) for p in draw_shots(ds, 2, seed=7).paths]
    assert rel == ["images/c0/img4.png", "images/c0/img0.png", "images/c1/img3.png", "images/c1/img4.png"]
    rel = [ds.relative_path(p) for p in draw_shots(ds, 2, seed=8).paths]
    assert rel == ["images/c0/img3.png", "images/c0/img2.png", "images/c1/img2.png", "images/c1/img0.png"]


@pytest.mark.parametrize("seed", [0, 1, 2, 123456789])
def test_draw_follows_the_documented_rule_and_nests(tmp_path, seed):
    ds = toy(tmp_path, {"c0": 20, "c1": 17, "c2": 5})
    previous: set[Item] = set()
    for shots in (1, 2, 4, 8, 16):
        draw = draw_shots(ds, shots, seed)
        assert list(draw.items) == reference_draw(ds, "train", seed, 0, shots)
        assert draw_shots(ds, shots, seed) == draw
        counts = [draw.labels.count(k) for k in range(3)]
        assert counts == [min(shots, 20), min(shots, 17), min(shots, 5)]  # a short class gives all it has
        assert previous <= set(draw.items)
        previous = set(draw.items)


def test_draws_differ_between_seeds_and_ignore_item_order(tmp_path):
    ds = toy(tmp_path, {"c0": 30, "c1": 30})
    assert draw_shots(ds, 4, 1).items != draw_shots(ds, 4, 2).items
    shuffled = Dataset(ds.name, ds.root, ds.classnames, ds.templates, train=ds.train[::-1])
    assert draw_shots(shuffled, 4, 1).items == draw_shots(ds, 4, 1).items


def test_validation_draw(tmp_path):
    with_val = toy(tmp_path, {"c0": 10, "c1": 10}, val=6)
    draw = draw_validation(with_val, 4, seed=3)
    assert (draw.role, draw.source) == ("val", "val")
    assert list(draw.items) == reference_draw(with_val, "val", 3, 0, 4)
    no_val = toy(tmp_path, {"c0": 10, "c1": 10})  # like ImageNet: ranks N..2N-1 of train
    draw = draw_validation(no_val, 4, seed=3)
    assert (draw.role, draw.source) == ("val", "train")
    assert list(draw.items) == reference_draw(no_val, "train", 3, 4, 8)
    assert not set(draw.items) & set(draw_shots(no_val, 4, seed=3).items)


def test_draw_errors(tmp_path):
    ds = toy(tmp_path, {"c0": 3})
    for shots in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="shots"):
            draw_shots(ds, shots, 0)
    test_only = Dataset("t", tmp_path, ("c0",), ("{}",), test=ds.train)
    with pytest.raises(InputError, match="no train split"):
        draw_shots(test_only, 1, 0)
    with pytest.raises(InputError, match="neither a val nor a train"):
        draw_validation(test_only, 1, 0)


def test_draw_json_round_trip_moves_with_the_dataset(tmp_path):
    write_split_json(tmp_path / "a", "dtd", "images", "split_zhou_DescribableTextures.json", ["banded", "dotted"], n=8)
    ds = read_coop("dtd", tmp_path / "a")
    draw = draw_shots(ds, 4, seed=1)
    write_draw(draw, tmp_path / "draw.json", ds)
    stored = json.loads((tmp_path / "draw.json").read_text())
    assert {"format", "format_version", "dataset", "role", "source", "shots", "seed", "items"} <= stored.keys()
    assert all(not Path(p).is_absolute() and p.startswith("images/") for p, _, _ in stored["items"])
    assert read_draw(tmp_path / "draw.json", ds) == draw
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another machine, another data root
    moved = read_coop("dtd", tmp_path / "b")
    assert read_draw(tmp_path / "draw.json", moved) == draw_shots(moved, 4, seed=1)


def test_read_draw_rejects_other_datasets_and_files(tmp_path):
    ds = toy(tmp_path, {"c0": 4, "c1": 4})
    write_draw(draw_shots(ds, 2, 0), tmp_path / "d.json", ds)
    other = Dataset("other", tmp_path, ds.classnames, ds.templates, train=ds.train)
    with pytest.raises(InputError, match="not of 'other'"):
        read_draw(tmp_path / "d.json", other)
    renamed = Dataset("toy", tmp_path, ("c0", "cX"), ds.templates)
    with pytest.raises(InputError, match="does not match the classes"):
        read_draw(tmp_path / "d.json", renamed)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not a prolip draw file"):
        read_draw(tmp_path / "bad.json", ds)
    with pytest.raises(InputError, match="cannot write draw file"):
        write_draw(draw_shots(ds, 2, 0), tmp_path / "missing" / "d.json", ds)


# ---------------------------------------------------------------------------- class splits
def test_base_new_split_as_cocoop(tmp_path):
    ds = toy(tmp_path, {f"c{k}": 5 for k in range(5)}, val=2)
    base, new = base_new_split(ds)
    assert base.classnames == ("c0", "c1", "c2") and new.classnames == ("c3", "c4")  # ceil(5/2) = 3 base
    assert {item.label for item in new.train} == {0, 1}
    assert [item.path for item in new.val] == [item.path for item in ds.val if item.label >= 3]
    assert all(new.classnames[item.label] == item.classname for item in new.train + new.val + new.test)
    full = {(item.path, item.classname) for item in draw_shots(ds, 2, 4).items if item.label < 3}
    assert {(item.path, item.classname) for item in draw_shots(base, 2, 4).items} == full


def test_select_classes_relabels_in_the_given_order(tmp_path):
    ds = toy(tmp_path, {"c0": 1, "c1": 1, "c2": 1})
    picked = select_classes(ds, [2, 0])
    assert picked.classnames == ("c2", "c0")
    assert [(item.label, item.classname) for item in picked.train] == [(1, "c0"), (0, "c2")]
    for bad in ([], [0, 0], [3]):
        with pytest.raises(InputError):
            select_classes(ds, bad)


# ---------------------------------------------------------------------------- a user's own data
def test_generic_reader_folders_and_csv(tmp_path):
    root = tmp_path / "mine"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                touch(root / split / c / f"{i}.png")
    touch(root / "extra" / "bird.png")
    (root / "val.csv").write_text("path,label\nextra/bird.png,bird\ntrain/cat/0.png,cat\n")
    ds = read_image_dataset(root)
    assert ds.name == "mine" and ds.classnames == ("bird", "cat", "dog")
    assert ds.templates == ("a photo of a {}.",)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.val[0] == Item(str(root / "extra" / "bird.png"), 0, "bird")
    (root / "templates.txt").write_text("# mine\na photo of my {}.\n\nmy {}, up close.\n")
    assert read_image_dataset(root).templates == ("a photo of my {}.", "my {}, up close.")
    assert read_dataset("mine", tmp_path) == read_image_dataset(root, name="mine")


def test_generic_reader_errors(tmp_path):
    with pytest.raises(InputError, match="holds no dataset"):
        read_image_dataset(tmp_path)
    touch(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train.csv").write_text("train/a/0.png,a\n")
    with pytest.raises(InputError, match=r"both train/ and train\.csv"):
        read_image_dataset(tmp_path)
    with pytest.raises(InputError, match="neither a CoOp reader name"):
        read_dataset("nothing-here", tmp_path)


def test_read_images_from_folders_csv_files_and_mixed_lists(tmp_path, caplog):
    from prolip.datasets.generic import read_images, read_labelled

    for name in ("b/2.png", "a/deep/er/1.JPG", "a/0.png", "z.webp"):
        touch(tmp_path / "photos" / name)
    for name in ("a/notes.txt", "b/.DS_Store", "readme"):
        touch(tmp_path / "photos" / name)
    photos = tmp_path / "photos"
    with caplog.at_level("INFO", logger="prolip.datasets.generic"):
        listed = read_images([photos])
    # Recursively, image files only (any case of suffix), sorted by path; the others counted.
    assert listed == [str(photos / p) for p in ("a/0.png", "a/deep/er/1.JPG", "b/2.png", "z.webp")]
    assert "skipped 3 files that are not image files" in caplog.text
    (tmp_path / "list.csv").write_text("path,label\nphotos/b/2.png,dog\n/abs/x.png,cat\n")
    (tmp_path / "bare.csv").write_text("photos/z.webp\n")
    mixed = read_images([str(tmp_path / "one.png"), tmp_path / "list.csv", photos / "b", tmp_path / "bare.csv"])
    assert mixed == [
        str(tmp_path / "one.png"), str(photos / "b" / "2.png"), "/abs/x.png", str(photos / "b" / "2.png"),
        str(photos / "z.webp"),
    ]  # fmt: skip
    assert read_images(str(photos / "z.webp")) == [str(photos / "z.webp")]
    touch(tmp_path / "empty" / "notes.txt")
    with pytest.raises(InputError, match="holds no image files"):
        read_images([tmp_path / "empty"])
    (tmp_path / "blank.csv").write_text("path\n")
    with pytest.raises(InputError, match="has no path rows"):
        read_images([tmp_path / "blank.csv"])
    with pytest.raises(InputError, match="no images given"):
        read_images([])
    # The labelled reader counts what it leaves out of a class-folder tree too.
    caplog.clear()
    with caplog.at_level("INFO", logger="prolip.datasets.generic"):
        _, labels = read_labelled(photos)
    assert labels == ["a", "a", "b"] and "skipped 4 files" in caplog.text


def test_read_templates(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}.\n  # comment\n\n  itap of a {}.  \n")
    assert read_templates(tmp_path / "t.txt") == ("a photo of a {}.", "itap of a {}.")
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(InputError, match="exactly one"):
        read_templates(tmp_path / "bad.txt")
    with pytest.raises(InputError, match="cannot read"):
        read_templates(tmp_path / "absent.txt")


# ---------------------------------------------------------------------------- the miniature suite
def test_mini_suite_is_readable_and_deterministic(tmp_path, mini_suite):
    mini_suite.make_suite(tmp_path / "a", seed=3, train=3, val=2, test=2)
    datasets = {name: read_dataset(name, tmp_path / "a") for name in COOP_DATASETS}
    for name, ds in datasets.items():
        counts = (len(ds.train), len(ds.val), len(ds.test))
        if name == "imagenet":
            assert counts == (30, 0, 20)
        elif name in ("imagenet_a", "imagenet_r"):
            assert counts == (0, 0, 10) and set(ds.class_ids) < set(datasets["imagenet"].class_ids)
        elif name in ("imagenetv2", "imagenet_sketch"):
            assert counts == (0, 0, 20) and ds.classnames == datasets["imagenet"].classnames
        else:
            assert counts == (30, 20, 20) and sorted(ds.classnames) == sorted(datasets["imagenet"].classnames)
        assert all(Path(item.path).is_file() for item in ds.train + ds.val + ds.test)
    assert read_templates(tmp_path / "a" / "standin-templates.txt") == tuple(mini_suite.standin.TEMPLATES)
    mini_suite.make_suite(tmp_path / "b", seed=3, train=3, val=2, test=2)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
