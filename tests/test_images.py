"""Unusual but valid images are converted to RGB, not rejected; hostile ones fail cleanly."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_images, tiny_adapter
from PIL import Image

from prolip.errors import ImageLoadError
from prolip.features.images import load_image, load_images_skipping


def _roundtrip(img: Image.Image, path: Path, **save_kw) -> torch.Tensor:
    img.save(path, **save_kw)
    out = load_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, img.height, img.width)
    return out


def test_grayscale(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = _roundtrip(Image.fromarray(arr, mode="L"), tmp_path / "g.png")
    for c in range(3):
        assert torch.equal(out[c], torch.from_numpy(arr))  # exact: uint8 pixels


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = _roundtrip(img, tmp_path / "p.png")
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [0, 0, 255]
    out = _roundtrip(img, tmp_path / "pt.png", transparency=1)  # palette entry 1 fully transparent
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [255, 255, 255]


def test_16_bit(tmp_path):
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    img.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (3, 1, 4) and out[0, 0].tolist() == [0, 1, 128, 255]


def test_rgba_and_la_over_white(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 255, 255)  # opaque blue
    arr[0, 1] = (0, 0, 255, 0)  # transparent
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black
    out = _roundtrip(Image.fromarray(arr, mode="RGBA"), tmp_path / "a.png")
    assert out[:, 0, 0].tolist() == [0, 0, 255]
    assert out[:, 0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[0, 1, 0] <= 135
    la = _roundtrip(Image.fromarray(arr[..., [2, 3]], mode="LA"), tmp_path / "la.png")
    assert la[:, 0, 1].tolist() == [255, 255, 255] and la[:, 0, 0].tolist() == [255, 255, 255]


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    img.paste((0, 255, 255, 0), (0, 0, 4, 8))  # full magenta + yellow = red
    out = _roundtrip(img, tmp_path / "c.jpg", quality=95)
    assert out[:, 4, 6].tolist() == pytest.approx([255, 255, 255], abs=8)
    assert out[:, 4, 1].tolist() == pytest.approx([255, 0, 0], abs=8)


def test_one_pixel_image_works_end_to_end(checkpoints, tmp_path):
    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "dot.png")
    assert load_image(tmp_path / "dot.png").tolist() == [[[10]], [[200]], [[30]]]
    images, labels = colour_images(2)
    adapter = tiny_adapter(checkpoints["vit"], epochs=1).fit([*images, str(tmp_path / "dot.png")], [*labels, "green"])
    assert adapter.predict([str(tmp_path / "dot.png")]).shape == (1,)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide × 20 high: left half red, right half blue. Orientation 6 means "rotate 90°
    # clockwise to display", so the displayed image is 20 wide × 40 high with red on top.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (3, 40, 20)
    top, bottom = out[:, 5, 10].tolist(), out[:, 35, 10].tolist()
    assert top == pytest.approx([255, 0, 0], abs=10) and bottom == pytest.approx([0, 0, 255], abs=10)
    # The same for an already-opened PIL image.
    assert torch.equal(load_image(Image.open(tmp_path / "rot.jpg")), out)  # exact: uint8 pixels, the same decoder


_MEASURE = textwrap.dedent(
    """
    import resource, sys
    from PIL import Image
    from prolip.features.images import load_image
    Image.new("RGB", (64, 64)).save(sys.argv[2])
    load_image(sys.argv[2], draft_size=896)  # warm up: imports, decoder, allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = load_image(sys.argv[1], draft_size=896)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(tuple(out.shape), (after - before) // 1024)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_10000_px_jpeg_is_decoded_in_bounded_memory(tmp_path):
    big = tmp_path / "big.jpg"
    img = Image.new("RGB", (10_000, 10_000), (200, 40, 40))
    img.paste((40, 40, 200), (0, 5_000, 10_000, 10_000))
    img.save(big, quality=80)
    del img
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(tmp_path / "small.png")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    shape, growth_mib = run.stdout.split(")")
    # Decoded at 1/4 scale (never 1/8, whose block means the model's resize could not hide).
    assert shape == "(3, 2500, 2500"
    # A full decode needs 300 MB for the pixels alone; at 1/4 scale the pixels take 19 MB.
    assert int(growth_mib) < 80, run.stdout


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60_000, 60_000))  # 3.6 gigapixels declared in 100 bytes
    with pytest.raises(ImageLoadError, match=r"image 0 \('.*bomb\.png'\) is too large to decode safely"):
        load_image(path)


def test_image_whose_data_ends_early(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(_png_header_only(500, 500))  # valid header, far too little pixel data
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(path, index=7)


def test_load_images_skipping_reports_what_and_why(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_text("nope")
    items = [tmp_path / "ok.png", tmp_path / "bad.jpg", np.zeros((4, 4, 2), np.uint8), torch.zeros(3, 2, 2)]
    result = load_images_skipping(items)
    assert result.kept == [0, 3] and len(result.images) == 2
    assert [(s.index, s.item) for s in result.skipped] == [(1, str(tmp_path / "bad.jpg")), (2, "ndarray")]
    assert "not an image" in result.skipped[0].reason and "channels" in result.skipped[1].reason
    with pytest.raises(ImageLoadError, match="image 1"):
        load_images_skipping(items, on_error="raise")
