"""The on-disk feature cache: hits, reuse, keys, resuming after crashes, concurrency, streaming fits."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, colour_images, tiny_adapter
from safetensors import safe_open

from prolip import InputError, ProLIPAdapter
from prolip.atomic import TEMP_PREFIX, safetensors_header
from prolip.errors import FeatureCacheError
from prolip.features import cache as cache_module
from prolip.features.cache import CachedFeatures, CacheKey, FeatureCache
from prolip.features.extract import feature_cache, image_hash
from prolip.model.backbone import build_backbone
from prolip.model.preprocessing import ViewConfig

VIEWS = 3


def assert_fp16_close(features: torch.Tensor, reference: torch.Tensor) -> None:
    """Features computed in other batches (other forward shapes) than ``reference``, stored as fp16, equal the
    fp16-rounded reference up to one fp16 step.

    The batch's matrix shapes change how BLAS kernels round the fp32 features in their last bits (from CPU to
    CPU), which can move an fp16 rounding by one step: 2^-10 relative to features of order 1, hence rtol=1e-3
    (atol for values near zero). Another image's features, or other crops, differ by far more.
    """
    torch.testing.assert_close(features, reference.half().float(), rtol=1e-3, atol=1e-5)


@pytest.fixture
def counted(monkeypatch):
    """``counted(adapter)``: make its tower record the batch size of every forward pass it runs."""

    def count(adapter: ProLIPAdapter) -> list[int]:
        projector = adapter.backbone.projector
        seen: list[int] = []
        original = projector.features

        def features(pixels: torch.Tensor) -> torch.Tensor:
            seen.append(len(pixels))
            return original(pixels)

        monkeypatch.setattr(projector, "features", features)  # an instance attribute shadows the method
        return seen

    return count


@pytest.fixture(scope="module")
def make(checkpoints):
    """``make(**params)``: a tiny ViT adapter with VIEWS views, sharing one already-built backbone."""
    built = tiny_adapter(checkpoints["vit"]).backbone

    def make(**params) -> ProLIPAdapter:
        return tiny_adapter(checkpoints["vit"], **{"model": built.model, "views": VIEWS, **params})

    return make


def entries(root: Path) -> list[Path]:
    return sorted(root.glob("v1/*/entries/*/*.safetensors"))


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], list[str]]:
    return colour_images(3, seed=5)  # 9 distinct images, 3 classes


@pytest.fixture(scope="module")
def reference(make, data) -> torch.Tensor:
    """In-memory features of ``data`` (no cache), float32 [VIEWS, 9, 48]."""
    return make().extract_features(data[0])


def test_cache_hit_is_identical_and_runs_no_model(make, counted, data, reference, tmp_path):
    images, _ = data
    first = make(cache_dir=tmp_path)
    calls = counted(first)
    features = first.extract_features(images)
    assert isinstance(features, CachedFeatures) and tuple(features.shape) == (VIEWS, 9, 48)
    assert sum(calls) == VIEWS * len(images)
    # The same crops as without the cache; stored as fp16, so equal to the fp16-rounded features. Bit-for-bit:
    # computed in the same one batch of all 9 images as the reference, the same ops on the same shapes.
    assert torch.equal(features.to_tensor(), reference.half().float())
    assert len(entries(tmp_path)) == len(images) and not temps(tmp_path)

    again = make(cache_dir=tmp_path)  # a new run
    calls = counted(again)
    assert torch.equal(again.extract_features(images).to_tensor(), reference.half().float())  # bit-for-bit: read back
    assert calls == []
    # Test-time features are never cached.
    assert isinstance(again.extract_features(images, views=0), torch.Tensor) and sum(calls) == len(images)

    exact = make(cache_dir=tmp_path, cache_dtype="fp32")
    assert torch.equal(exact.extract_features(images).to_tensor(), reference)  # bit-for-bit: the same one batch


def test_images_are_reused_across_lists_and_positions(make, counted, data, reference, tmp_path):
    images, _ = data
    adapter = make(cache_dir=tmp_path)
    adapter.extract_features(images[:5])
    calls = counted(adapter)
    subset = [images[4], images[2], *images[6:]]  # two cached, three new, in another order
    features = adapter.extract_features(subset).to_tensor()
    assert sum(calls) == 3 * VIEWS
    assert_fp16_close(features, reference[:, [4, 2, 6, 7, 8]])  # computed in batches of 5 and 3 images, not 9


def test_resumes_after_an_exception_midway(make, counted, data, reference, tmp_path, monkeypatch):
    images, _ = data
    original, written = FeatureCache.write, []

    def failing(self, image_hash, features):
        if len(written) == 4:
            raise RuntimeError("simulated crash")
        original(self, image_hash, features)
        written.append(image_hash)

    monkeypatch.setattr(FeatureCache, "write", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(cache_dir=tmp_path, batch_size=2).extract_features(images)
    monkeypatch.undo()
    assert len(entries(tmp_path)) == 4

    rerun = make(cache_dir=tmp_path, batch_size=2)
    calls = counted(rerun)
    features = rerun.extract_features(images)
    assert sum(calls) == (len(images) - 4) * VIEWS  # the finished images are not recomputed
    assert_fp16_close(features.to_tensor(), reference)  # computed 2 views at a time, not in one batch


def _script(tmp_path: Path, body: str) -> Path:
    """A Python script that sets up the tiny test models, then runs ``body``."""
    path = tmp_path / "job.py"
    header = f"""
        import os, sys
        os.environ["HF_HUB_OFFLINE"] = "1"
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import open_clip
        open_clip.add_model_config({str(CONFIGS)!r})
        from conftest import colour_images, tiny_adapter
        images, _ = colour_images(3, seed=5)
    """
    path.write_text(textwrap.dedent(header) + textwrap.dedent(body))
    return path


def _run(*scripts: Path, args: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """Run the scripts at the same time; return their results in order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [
        subprocess.Popen([sys.executable, str(s), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for s in scripts
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_hard_crash_leaves_no_torn_entry_and_resumes(make, counted, checkpoints, data, reference, tmp_path):
    images, _ = data
    # The process dies after writing a temporary file, before the third entry is moved into place.
    body = """
        import prolip.atomic as files
        original, entries = files._publish, []
        def publish(tmp, path, exclusive):
            entries.extend([path] if path.endswith(".safetensors") else [])
            if len(entries) == 3:
                os._exit(3)
            return original(tmp, path, exclusive)
        files._publish = publish
        tiny_adapter(sys.argv[1], views=3, cache_dir=sys.argv[2], batch_size=2).extract_features(images)
    """
    (crashed,) = _run(_script(tmp_path, body), args=(checkpoints["vit"], str(tmp_path / "cache")))
    assert crashed.returncode == 3, crashed.stderr.decode()[-2000:]
    root = tmp_path / "cache"
    assert len(entries(root)) == 2 and len(temps(root)) == 1  # the torn write is only a temp file

    rerun = make(cache_dir=root, batch_size=2)
    calls = counted(rerun)
    assert_fp16_close(rerun.extract_features(images).to_tensor(), reference)  # 2 views at a time, 2 processes
    assert sum(calls) == (len(images) - 2) * VIEWS


@pytest.mark.slow
def test_two_processes_filling_one_cache_leave_it_consistent(make, counted, checkpoints, data, reference, tmp_path):
    images, _ = data
    body = """
        more, _ = colour_images(4, seed=9)  # enough work for the two processes to overlap
        adapter = tiny_adapter(sys.argv[1], views=3, cache_dir=sys.argv[2], batch_size=4)
        features = adapter.extract_features(images + more)
        print(float(features.to_tensor().sum()))
    """
    script = _script(tmp_path, body)
    root = tmp_path / "cache"
    results = _run(script, script, args=(checkpoints["vit"], str(root)))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr.decode()[-2000:]
    assert len(entries(root)) == 9 + 12 and not temps(root)
    adapter = make(cache_dir=root)
    cache = feature_cache(adapter.backbone, adapter.cache_dir, views=VIEWS, seed=0)
    assert all(cache.has(image_hash(im)) for im in images)
    calls = counted(adapter)
    assert_fp16_close(adapter.extract_features(images).to_tensor(), reference)  # other processes, batches of 4
    assert calls == []
    # Both processes read the same pack of the same image list.
    assert len(list(root.glob("v1/*/packs/*.safetensors"))) == 2  # theirs, and the one just read


def test_keys_differ_by_seed_model_augmentation_views_precision_and_dtype(make, counted, checkpoints, data, tmp_path):
    config = ViewConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    base = CacheKey(model="m", precision="fp32", config=config, seed=0, views=3, storage="fp16")
    variants = [
        dataclasses.replace(base, seed=1),
        dataclasses.replace(base, model="other"),
        dataclasses.replace(base, config=dataclasses.replace(config, scale=(0.3, 1.0))),
        dataclasses.replace(base, config=dataclasses.replace(config, flip_p=0.0)),
        dataclasses.replace(base, config=dataclasses.replace(config, size=64)),
        dataclasses.replace(base, views=4),
        dataclasses.replace(base, precision="fp16"),
        dataclasses.replace(base, storage="fp32"),
    ]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == 1 + len(variants)
    assert CacheKey(**dataclasses.asdict(base) | {"config": config}).digest() == base.digest()

    # The model key covers the whole tower, not only W0.
    model = tiny_adapter(checkpoints["vit"]).backbone.model
    before = build_backbone(model, None).tower_hash
    with torch.no_grad():
        model.visual.transformer.resblocks[0].mlp.c_fc.weight[0, 0] += 1
    assert build_backbone(model, None).tower_hash != before

    images, _ = data
    make(cache_dir=tmp_path).extract_features(images[:2])
    other_seed = make(cache_dir=tmp_path, random_state=1)
    calls = counted(other_seed)
    other_seed.extract_features(images[:2])
    assert sum(calls) == 2 * VIEWS and len(list(tmp_path.glob("v1/*"))) == 2


@pytest.mark.parametrize("storage", ["fp16", "fp32"])
def test_fit_on_cached_features_equals_fit_in_memory(make, data, reference, tmp_path, storage):
    images, labels = data
    cached = make(cache_dir=tmp_path, cache_dtype=storage)
    cached.fit(images, labels)
    in_memory = make()
    in_memory.fit_features(reference.half().float() if storage == "fp16" else reference, labels)
    # bit-for-bit: the cache computed the same one batch as the reference and rounded it the same way: both fits run
    # the same ops on the same features and shapes
    assert torch.equal(cached.delta_, in_memory.delta_)
    assert cached.get_params()["cache_dir"] == tmp_path and cached.get_params()["cache_dtype"] == storage


def test_training_holds_one_view_at_a_time(make, data, tmp_path, monkeypatch):
    images, labels = data
    adapter = make(cache_dir=tmp_path, epochs=7)
    features = adapter.extract_features(images)
    alive: list[weakref.ref] = []
    live_at_read: list[int] = []
    original = CachedFeatures.__getitem__

    def tracked(self, view):
        live_at_read.append(sum(r() is not None for r in alive))
        out = original(self, view)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(CachedFeatures, "__getitem__", tracked)
    monkeypatch.setattr(CachedFeatures, "to_tensor", lambda self: pytest.fail("training materialised all views"))
    adapter.fit_features(features, labels)
    assert len(live_at_read) == 7  # one read per step
    assert max(live_at_read) <= 1  # only the previous step's view is still referenced while the next loads


def test_pack_is_built_in_bounded_blocks_and_files_are_safetensors(make, data, reference, tmp_path, monkeypatch):
    images, _ = data
    adapter = make(cache_dir=tmp_path)
    monkeypatch.setattr(cache_module, "PACK_BUFFER_BYTES", 2 * VIEWS * 48 * 2)  # two images per block
    features = adapter.extract_features(images)
    # bit-for-bit: all 9 images computed in one batch, as the reference (the block size only cuts the pack's writes)
    assert torch.equal(features[2], reference[2].half().float())
    with safe_open(str(features.pack_path), framework="pt") as f:
        assert torch.equal(f.get_tensor("features").float(), reference.half().float())
    with safe_open(str(entries(tmp_path)[0]), framework="pt") as f:
        assert f.get_tensor("features").shape == (VIEWS, 48) and f.metadata()["image"] == entries(tmp_path)[0].stem
    assert torch.equal(features[-1], features[VIEWS - 1])  # bit-for-bit: the same stored view
    with pytest.raises(IndexError, match="out of range"):
        features[VIEWS]


def test_damaged_entry_is_recomputed(make, counted, data, reference, tmp_path):
    images, _ = data
    adapter = make(cache_dir=tmp_path)
    adapter.extract_features(images)
    damaged = feature_cache(adapter.backbone, adapter.cache_dir, views=VIEWS, seed=0).entry_path(image_hash(images[3]))
    damaged.write_bytes(damaged.read_bytes()[:-10])
    for pack in tmp_path.glob("v1/*/packs/*"):
        pack.unlink()
    calls = counted(adapter)
    assert_fp16_close(adapter.extract_features(images).to_tensor(), reference)  # the damaged image recomputed alone
    assert sum(calls) == VIEWS


UPGRADE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "upgrade_feature_cache.py"


def drop_checksum(path: Path) -> None:
    """Rewrite a cache entry as prolip wrote them before checksums: its header without ``sha256``."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    del header["__metadata__"]["sha256"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


@pytest.mark.slow
def test_an_entry_without_its_checksum_is_recomputed_or_upgraded_by_the_script(
    make, counted, data, reference, tmp_path
):
    """An entry as prolip wrote them before checksums: refused (recomputed); scripts/upgrade_feature_cache.py keeps it."""
    images, _ = data
    adapter = make(cache_dir=tmp_path)
    adapter.extract_features(images)
    cache = feature_cache(adapter.backbone, adapter.cache_dir, views=VIEWS, seed=0)
    hashes = [image_hash(im) for im in images]
    stored = cache.read(hashes[0])
    for path in entries(tmp_path):  # drop the checksum from every header: the earlier format
        drop_checksum(path)
    assert not any(cache.has(h) for h in hashes)
    script = UPGRADE_SCRIPT
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True)
    assert f"{len(set(hashes))} entries given their checksum" in done.stdout
    assert all(cache.has(h) for h in hashes) and not list(tmp_path.glob("v1/*/packs/*"))
    assert torch.equal(cache.read(hashes[0]), stored)  # the same bytes, read back
    calls = counted(adapter)
    assert_fp16_close(adapter.extract_features(images).to_tensor(), reference)
    assert calls == []  # nothing extracted again


def legacy_cache(root: Path, seed: int = 0, count: int = 4) -> tuple[FeatureCache, list[str]]:
    """A cache of ``count`` entries (2 views of width 8, fp16) as prolip wrote them before checksums; no model."""
    config = ViewConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cache = FeatureCache(root, CacheKey(model="m", precision="fp32", config=config, seed=seed, views=2), 8)
    hashes = [f"{k:02x}" * 32 for k in range(count)]
    for k, h in enumerate(hashes):
        cache.write(h, torch.full((2, 8), float(k)))
    CachedFeatures(cache, hashes).prepare()  # a pack, for the script to delete
    for h in hashes:
        drop_checksum(cache.entry_path(h))
    return cache, hashes


def run_upgrade(root: Path, monkeypatch, capsys) -> tuple[object, str, list[str]]:
    """scripts/upgrade_feature_cache.py ROOT, in this process: its exit status, stdout and stderr lines."""
    spec = importlib.util.spec_from_file_location("upgrade_feature_cache", UPGRADE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(UPGRADE_SCRIPT), str(root)])
    status = module.main()
    out = capsys.readouterr()
    return status, out.out, out.err.splitlines()


def legacy_entry(cache: FeatureCache, name: str, data: bytes, dtype: str = "F16", shape=(2, 8), **meta) -> Path:
    """A hand-made entry ``name`` without its checksum: the header says ``dtype``, ``shape`` and the metadata ``meta``."""
    meta = {"format": cache_module.CACHE_FORMAT, "format_version": "1", "settings": cache.digest, "image": name} | meta
    path = cache.entry_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_header([("features", dtype, list(shape), len(data))], meta) + data)
    return path


def test_the_upgrade_script_never_follows_a_link_out_of_the_cache(tmp_path, monkeypatch, capsys):
    cache, hashes = legacy_cache(tmp_path / "cache")
    outside = tmp_path / "outside"  # packs/ linked to a folder of the user's: the script deleted all of it
    outside.mkdir()
    (outside / "thesis.tex").write_text("mine")
    shutil.rmtree(cache.folder / "packs")
    (cache.folder / "packs").symlink_to(outside)
    group = cache.entry_path(hashes[0]).parent  # an entries folder linked elsewhere: its file was rewritten
    shutil.move(group, tmp_path / "elsewhere")
    group.symlink_to(tmp_path / "elsewhere")
    linked = tmp_path / "linked.safetensors"  # one entry a link to a file elsewhere
    shutil.move(cache.entry_path(hashes[1]), linked)
    cache.entry_path(hashes[1]).symlink_to(linked)
    before = {p: p.read_bytes() for p in [*(tmp_path / "elsewhere").iterdir(), linked]}
    status, out, err = run_upgrade(tmp_path / "cache", monkeypatch, capsys)
    assert (outside / "thesis.tex").read_text() == "mine"
    assert {p: p.read_bytes() for p in before} == before
    assert status == 0 and "2 entries given their checksum" in out
    for path in (cache.folder / "packs", group, cache.entry_path(hashes[1])):
        assert sum(str(path) in line and "symbolic link" in line for line in err) == 1, err
    assert [cache.has(h) for h in hashes] == [False, False, True, True]


def test_the_upgrade_script_vouches_only_for_entries_the_cache_format_allows(tmp_path, monkeypatch, capsys):
    cache, hashes = legacy_cache(tmp_path / "cache")
    values = torch.ones(2, 8, dtype=torch.float16)
    values[1, 3] = float("nan")
    damaged = {  # what each damaged entry is, and what its line says
        legacy_entry(cache, "a0" * 32, values.numpy().tobytes()): "NaN or Inf",
        legacy_entry(cache, "a1" * 32, torch.full((2, 8), float("inf")).half().numpy().tobytes()): "NaN or Inf",
        legacy_entry(cache, "a2" * 32, bytes(32), shape=(4, 4)): "of shape [2, 8]",
        legacy_entry(cache, "a3" * 32, bytes(64), dtype="F32"): "F16 features",
        legacy_entry(cache, "a4" * 32, bytes(32), image="a5" * 32): "for this key",  # another image's features
        legacy_entry(cache, "a6" * 32, bytes(32), settings="0" * 64): "for this key",  # another key's
    }
    garbage = cache.entry_path("a7" * 32)
    garbage.parent.mkdir()
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]      " + bytes(40))
    damaged[garbage] = "malformed header"
    listed = cache.entry_path("a8" * 32)  # a header whose tensor entry is a list, not an object
    listed.parent.mkdir()
    text = json.dumps({"features": [1], "__metadata__": {"image": "a8" * 32}}).encode()
    listed.write_bytes(struct.pack("<Q", len(text)) + text + bytes(32))
    damaged[listed] = "does not hold F16 features"
    other, other_hashes = legacy_cache(tmp_path / "cache", seed=1)  # a settings folder whose settings were edited
    settings = json.loads((other.folder / "settings.json").read_text())
    (other.folder / "settings.json").write_text(json.dumps({**settings, "views": 3}))
    status, out, err = run_upgrade(tmp_path / "cache", monkeypatch, capsys)
    assert status == 0 and "4 entries given their checksum" in out and f"{len(damaged)} damaged" in out
    assert all("Traceback" not in line for line in err)
    for path, fault in damaged.items():
        (line,) = [line for line in err if str(path) in line]
        assert "left to be recomputed" in line and fault in line, line
        assert not cache.has(path.stem)  # still without a checksum: the cache recomputes it
    (line,) = [line for line in err if str(other.folder) in line]
    assert "settings.json" in line and "nothing in it changed" in line
    assert not any(other.has(h) for h in other_hashes) and list(other.folder.glob("packs/*"))
    assert all(cache.has(h) for h in hashes) and not list(cache.folder.glob("packs/*"))
    assert [float(cache.read(h).float().mean()) for h in hashes] == [0.0, 1.0, 2.0, 3.0]  # the same bytes


def test_bad_values_and_settings_are_reported(make, checkpoints, data, tmp_path):
    images, labels = data
    adapter = make(cache_dir=tmp_path)
    cache = feature_cache(adapter.backbone, adapter.cache_dir, views=VIEWS, seed=0)
    hashes = [image_hash(im) for im in images]
    for k, h in enumerate(hashes):
        values = torch.zeros(VIEWS, 48)
        if k == 4:
            values[1, 7] = float("nan")
        cache.write(h, values)
    with pytest.raises(InputError, match=r"NaN or Inf \(first at view 1, image 4, column 7"):
        adapter.fit_features(cache.features(hashes), labels)
    assert not hasattr(adapter, "delta_")
    with pytest.raises(FeatureCacheError, match=r"exceed the fp16 range.*cache_dtype='fp32'"):
        cache.write("ab" * 32, torch.full((VIEWS, 48), 1e6))
    with pytest.raises(FeatureCacheError, match="1 of the images have no cached features"):
        cache.features([*hashes, "cd" * 32])
    with pytest.raises(InputError, match="cache_dtype='bf16'"):
        make(cache_dir=tmp_path, cache_dtype="bf16").extract_features(images)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(FeatureCacheError, match="a-file"):
        make(cache_dir=blocked).extract_features(images)
    other_width = tiny_adapter(checkpoints["modified_resnet"], "modified_resnet")
    with pytest.raises(InputError, match=r"shape \(3, 4, 48\)"):
        other_width.fit_features(cache.features(hashes[:4]), labels[:4])


def test_a_residual_tower_caches_the_residual_beside_x(checkpoints, tmp_path):
    # SigLIP's attention-pool head adds a per-image residual after its last linear map: the cache
    # must store it with x, and training on cached features must equal training on fresh ones.
    images, labels = colour_images(2)
    fresh = tiny_adapter(checkpoints["timm_map"], "timm_map", epochs=5)
    features = fresh.extract_features(images)
    projector = fresh.backbone.projector
    assert projector.has_residual and features.shape[-1] == projector.in_features + projector.out_features
    cached = tiny_adapter(checkpoints["timm_map"], "timm_map", epochs=5, cache_dir=tmp_path, cache_dtype="fp32")
    stored = cached.extract_features(images)
    assert isinstance(stored, CachedFeatures)
    torch.testing.assert_close(stored.to_tensor(), features, rtol=1e-5, atol=1e-5)
    fresh.fit_features(features, labels)
    cached.fit_features(stored, labels)
    torch.testing.assert_close(cached.delta_, fresh.delta_, rtol=1e-4, atol=1e-6)
