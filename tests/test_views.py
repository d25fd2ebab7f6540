"""Augmented and plain views: crop statistics, flips, determinism, agreement with open_clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prolip.features.views import augmented_views, crop_grid, plain_views, sample_crops
from prolip.model.preprocessing import ViewConfig

CONFIG = ViewConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_crop_scale_ratio_and_flip_statistics():
    sizes = [(60, 80), (100, 100), (41, 33)]
    crops = sample_crops(sizes, views=4000, config=CONFIG, seed=0)
    hw = torch.tensor(sizes, dtype=torch.float64)
    area = (crops.height * crops.width).double() / (hw[:, 0] * hw[:, 1])
    aspect = crops.width.double() / crops.height.double()
    # Rounding to whole pixels moves area and ratio slightly past the nominal bounds.
    assert area.min() > 0.5 - 0.05 and area.max() <= 1.0 + 1e-9
    assert aspect.min() > 3 / 4 - 0.06 and aspect.max() < 4 / 3 + 0.06
    # Same distribution as torchvision's RandomResizedCrop, image by image (boxes that do not
    # fit are redrawn, which skews both towards smaller, squarer crops on non-square images).
    from torchvision.transforms import RandomResizedCrop

    with torch.random.fork_rng():
        torch.manual_seed(0)
        for i, (h, w) in enumerate(sizes):
            ref = torch.tensor(
                [RandomResizedCrop.get_params(torch.empty(1, h, w), [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
                dtype=torch.float64,
            )
            ref_area = ref[:, 2] * ref[:, 3] / (h * w)
            ref_log_aspect = (ref[:, 3] / ref[:, 2]).log()
            assert abs(area[:, i].mean() - ref_area.mean()) < 0.01
            assert abs(area[:, i].std() - ref_area.std()) < 0.01
            assert abs(aspect[:, i].log().mean() - ref_log_aspect.mean()) < 0.015
            assert abs(aspect[:, i].log().std() - ref_log_aspect.std()) < 0.015
    assert abs(crops.flip.double().mean().item() - 0.5) < 0.02
    # Boxes lie inside their images.
    assert (crops.top >= 0).all() and (crops.left >= 0).all()
    assert (crops.top + crops.height <= hw[:, 0].long()).all()
    assert (crops.left + crops.width <= hw[:, 1].long()).all()
    # Positions cover the whole admissible range, not just the centre.
    slack = hw[:, 0].long() - crops.height
    assert ((crops.top == 0) & (slack > 0)).any() and ((crops.top == slack) & (slack > 0)).any()


def test_crops_are_deterministic_per_seed():
    a = sample_crops([(50, 70)] * 3, views=10, config=CONFIG, seed=3)
    b = sample_crops([(50, 70)] * 3, views=10, config=CONFIG, seed=3)
    c = sample_crops([(50, 70)] * 3, views=10, config=CONFIG, seed=4)
    # exact: integer boxes and boolean flips
    assert torch.equal(a.top, b.top) and torch.equal(a.width, b.width) and torch.equal(a.flip, b.flip)
    assert not (torch.equal(a.top, c.top) and torch.equal(a.width, c.width))


def test_flip_mirrors_the_crop():
    image = torch.arange(3 * 40 * 40, dtype=torch.float32).reshape(3, 40, 40).remainder(256).to(torch.uint8)
    crops = sample_crops([(40, 40)], views=200, config=CONFIG, seed=0)
    flipped = [v for v in range(200) if crops.flip[v, 0]]
    kept = [v for v in range(200) if not crops.flip[v, 0]]
    # Two views with the same box but different flips must be mirror images of each other.
    for v in flipped:
        for u in kept:
            same_box = all(
                int(getattr(crops, f)[v, 0]) == int(getattr(crops, f)[u, 0]) for f in ("top", "left", "height", "width")
            )
            if same_box:
                a = augmented_views([image], [(v, 0)], crops, CONFIG)
                b = augmented_views([image], [(u, 0)], crops, CONFIG)
                torch.testing.assert_close(a, b.flip(-1))
                return
    # With full-size fallback boxes absent, force the comparison on a constructed pair.
    crops.flip[0, 0], crops.flip[1, 0] = True, False
    for f in ("top", "left", "height", "width"):
        getattr(crops, f)[1, 0] = getattr(crops, f)[0, 0]
    a = augmented_views([image], [(0, 0)], crops, CONFIG)
    b = augmented_views([image], [(1, 0)], crops, CONFIG)
    torch.testing.assert_close(a, b.flip(-1))


def test_plain_view_matches_open_clip_preprocessing():
    import open_clip

    # A smooth image: resampling kernels agree on low frequencies, not on pixel noise.
    yy, xx = np.mgrid[0:48, 0:64]
    waves = [np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)]
    array = np.ascontiguousarray((127.5 + 120 * np.stack(waves, axis=-1)).astype(np.uint8))
    transform = open_clip.image_transform(32, is_train=False, mean=CONFIG.mean, std=CONFIG.std)
    expected = transform(Image.fromarray(array))
    ours = plain_views([torch.from_numpy(array).permute(2, 0, 1)], CONFIG)[0]
    assert ours.shape == expected.shape == (3, 32, 32)
    # PIL's and torch's bicubic kernels differ slightly; the images must agree closely.
    assert (ours - expected).abs().mean() < 0.05 * (expected.std())


@pytest.mark.parametrize(("image_size", "tolerance"), [((28, 28), 0.025), ((60, 80), 0.025)])
def test_batched_views_match_crop_then_resize(image_size, tolerance):
    """The batched grid_sample views equal cutting each box and resizing it (antialiased bicubic)."""
    yy, xx = np.mgrid[0 : image_size[0], 0 : image_size[1]]
    image = torch.from_numpy(
        np.stack([127.5 + 120 * np.sin(xx / 4.0 + c) * np.cos(yy / 3.0 - c) for c in range(3)]).astype(np.uint8)
    )
    crops = sample_crops([image_size], views=40, config=CONFIG, seed=1)
    pairs = [(v, 0) for v in range(40)]
    batched = augmented_views([image], pairs, crops, CONFIG)
    for v in range(40):
        t, lft, h, w = (int(getattr(crops, f)[v, 0]) for f in ("top", "left", "height", "width"))
        box = image[:, t : t + h, lft : lft + w][None].float()
        ref = F.interpolate(box, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        ref = ref.flip(-1) if crops.flip[v, 0] else ref
        ref = (ref / 255 - 0.5) / 0.25
        # Relative to the image's spread: the kernels differ a little at the borders and in antialiasing.
        assert (batched[v] - ref[0]).abs().mean() < tolerance * ref.std(), v


@pytest.mark.parametrize("threads", [1, 2])
def test_crop_grid_is_affine_grid_to_rounding(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for side in (7, 224, 448, 449):
            n = int(torch.randint(1, 70, (1,), generator=g))
            theta = torch.zeros(n, 2, 3)
            flip = torch.where(torch.rand(n, generator=g) > 0.5, -1.0, 1.0)
            theta[:, 0, 0] = flip * (0.05 + torch.rand(n, generator=g))
            theta[:, 1, 1] = 0.05 + torch.rand(n, generator=g)
            theta[:, :, 2] = torch.rand(n, 2, generator=g) * 2 - 1
            expected = F.affine_grid(theta, [n, 3, side, side], align_corners=False)
            # Not bit-for-bit: affine_grid's product is [N, side², 3] × [N, 3, 2], crop_grid's [N, side, 3] ×
            # [N, 3, 2]; kernels for other shapes may fuse x·θ + t into one rounding or two. Coordinates are at
            # most 2.05 in size (fp32 ulp 2.4e-7): 1e-6 is a few ulps, far below a pixel (2 / side).
            torch.testing.assert_close(crop_grid(theta, side), expected, rtol=0, atol=1e-6, msg=f"side {side}")
    finally:
        torch.set_num_threads(previous)
