"""Inputs that once hung, exhausted memory or gave a traceback: each is now one clean error, or read as documented."""

from __future__ import annotations

import os

import pytest
from conftest import colour_images, run_prolip, tiny_adapter
from PIL import Image

from prolip import ImageLoadError, InputError
from prolip.datasets.generic import read_labelled
from prolip.datasets.templates import read_class_names


def test_an_image_that_is_a_fifo_or_a_link_to_a_device_is_refused_before_it_is_opened(tmp_path, checkpoints):
    os.mkfifo(tmp_path / "pipe.png")  # opening it to read would block until a writer comes
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    adapter = tiny_adapter(checkpoints["vit"], epochs=1, views=1).fit(*colour_images(1))
    for name in ("pipe.png", "zero.png"):
        with pytest.raises(ImageLoadError, match=rf"{name}.*not a regular file \(a FIFO, device or socket\)"):
            adapter.predict([str(tmp_path / name)])


def test_a_classes_file_that_is_a_device_or_not_utf8_is_one_error_and_a_bom_is_dropped(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        read_class_names("/dev/zero")  # read until the OOM killer, before
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"is not UTF-8 text \(byte 3\); save it as UTF-8"):
        read_class_names(tmp_path / "latin1.txt")
    (tmp_path / "bom.txt").write_bytes("\ufeffcat\ndog\n".encode())  # as Windows' Notepad writes UTF-8
    assert read_class_names(tmp_path / "bom.txt") == ["cat", "dog"]
    (tmp_path / "huge.txt").write_bytes(b"x" * (64 * 1024 * 1024 + 1))
    with pytest.raises(InputError, match="larger than 64 MiB"):
        read_class_names(tmp_path / "huge.txt")


def test_a_csv_that_is_not_utf8_or_has_a_huge_field_is_one_error(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "latin1.csv").write_bytes("a.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_labelled(tmp_path / "latin1.csv")
    (tmp_path / "huge.csv").write_text("a.png," + "x" * 200_000 + "\n")  # beyond csv's field limit
    with pytest.raises(InputError, match=r"huge\.csv' line 1: not a readable CSV row"):
        read_labelled(tmp_path / "huge.csv")
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\na.png,cat\n".encode())
    assert read_labelled(tmp_path / "bom.csv")[1] == ["cat"]  # the header is recognised despite the BOM


def test_file_names_with_terminal_escapes_never_reach_the_terminal_raw(tmp_path, checkpoints):
    from prolip import standin

    folder = tmp_path / "data"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10) if name == "a" else (10, 10, 200)).save(folder / name / "0.png")
    (folder / "a" / "evil\x1b[31m.png").write_bytes(b"not an image")  # a name a stranger's archive may hold
    model = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG]
    done = run_prolip("fit", str(folder), *model, "--views", "1", "--epochs", "1", "--on-error", "skip",
                      "--out", str(tmp_path / "d.safetensors"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr and "evil\\x1b[31m.png" in done.stderr  # the skip warning, escaped
