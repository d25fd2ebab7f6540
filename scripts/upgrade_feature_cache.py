"""Give a feature cache written before per-entry checksums the SHA-256 its entries now carry.

prolip's feature cache records, since the red-team hardening, the SHA-256 of each entry's feature
bytes in the entry's header, and treats an entry without one as damaged (it is recomputed). A
cache folder written by an earlier prolip holds valid features without that checksum; this
script adds it to every such entry (the bytes are kept as they are) and deletes the packs (they
are rebuilt from the entries on demand), so the features need not be extracted again.

It vouches only for what the cache format requires (:meth:`prolip.features.cache.FeatureCache.check_entry`):
each settings folder's ``settings.json`` must be the settings its name is the digest of, and each
entry must hold that key's dtype and shape ``[views, width]``, the metadata of its settings and
image, and finite values. An entry that does not is reported, one line each, and left without a
checksum: the cache recomputes it. The script stays inside the cache folder: it never follows a
symbolic link below it (a linked folder or file is reported and skipped, nothing in it read,
rewritten or deleted). It cannot tell features that are wrong but well-formed from right ones, so
run it only on a cache folder you wrote yourself.

Run: ``.venv/bin/python scripts/upgrade_feature_cache.py build/bench-cache``
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from prolip.errors import FeatureCacheError
from prolip.features.cache import CACHE_VERSION, FeatureCache

ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")  # <SHA-256 of the decoded image>.safetensors


def _report(counts: Counter, kind: str, line: str) -> None:
    counts[kind] += 1
    print(line, file=sys.stderr)


def _below(folder: Path, counts: Counter) -> Iterator[os.DirEntry]:
    """The entries of ``folder``, a symbolic link among them reported and skipped (never followed)."""
    with os.scandir(folder) as found:
        for entry in sorted(found, key=lambda e: e.name):
            if entry.is_symlink():
                _report(counts, "links", f"{entry.path}: a symbolic link, skipped (the cache's own files only)")
            else:
                yield entry


def _folder(path: Path, counts: Counter) -> bool:
    """Whether ``path`` is a real folder to walk into (a link to one is reported and skipped)."""
    if path.is_symlink():
        _report(counts, "links", f"{path}: a symbolic link, skipped (the cache's own files only)")
        return False
    return path.is_dir()


def upgrade_settings_folder(folder: Path, counts: Counter) -> None:
    """Give every entry of one settings folder that lacks it its checksum, then delete the folder's packs."""
    settings = folder / "settings.json"
    if settings.is_symlink():
        _report(counts, "links", f"{settings}: a symbolic link, skipped with its folder (the cache's own files only)")
        return
    try:
        cache = FeatureCache.from_folder(folder)
    except FeatureCacheError as exc:
        _report(counts, "folders", f"a settings folder skipped, nothing in it changed: {exc}")
        return
    entries = folder / "entries"
    for group in _below(entries, counts) if _folder(entries, counts) else ():
        if not group.is_dir(follow_symlinks=False):
            continue
        for file in _below(Path(group.path), counts):
            path = Path(file.path)
            if not ENTRY_NAME.fullmatch(file.name) or cache.entry_path(path.stem) != path:
                continue  # not an entry (a temporary file of a killed writer, ...): the cache never reads it
            if not file.is_file(follow_symlinks=False):
                _report(counts, "damaged", f"{path}: not a regular file; left to be recomputed")
                continue
            try:
                data, checksum = cache.check_entry(path.stem)
            except FeatureCacheError as exc:
                _report(counts, "damaged", f"left to be recomputed (not upgraded): {exc}")
                continue
            if checksum is not None:
                counts["kept"] += 1
                continue
            features = torch.from_numpy(data).reshape(cache.rows, cache.width)
            cache.write(path.stem, features, replace=True)  # the same bytes, with their checksum
            counts["upgraded"] += 1
    packs = folder / "packs"
    for pack in _below(packs, counts) if _folder(packs, counts) else ():
        if pack.is_file(follow_symlinks=False):
            os.unlink(pack.path)


def upgrade(root: Path) -> Counter:
    """Upgrade every settings folder of the cache at ``root``; returns the counts of what was done and found."""
    counts: Counter = Counter()
    version = root / f"v{CACHE_VERSION}"
    for folder in _below(version, counts) if _folder(version, counts) else ():
        if folder.is_dir(follow_symlinks=False):
            upgrade_settings_folder(Path(folder.path), counts)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Upgrade every entry under the cache root given on the command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the cache folder (--cache-dir of prolip bench)")
    root = parser.parse_args(argv).root
    if not root.is_dir():
        print(f"{root}: not a folder; give the feature cache folder (--cache-dir of prolip bench)", file=sys.stderr)
        return 2
    try:
        counts = upgrade(root)
    except (OSError, FeatureCacheError) as exc:  # a folder that cannot be listed, an entry that cannot be written
        print(f"{root}: stopped, the entries done so far are kept: {exc}", file=sys.stderr)
        return 1
    print(
        f"{root}: {counts['upgraded']} entries given their checksum, {counts['kept']} had one, {counts['damaged']} "
        f"damaged (left to be recomputed), {counts['links'] + counts['folders']} links or folders skipped; packs "
        "deleted (rebuilt on demand)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
