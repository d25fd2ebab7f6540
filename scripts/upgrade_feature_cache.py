"""Give a feature cache written before per-entry checksums the SHA-256 its entries now carry.

prolip's feature cache records, since the red-team hardening, the SHA-256 of each entry's feature
bytes in the entry's header, and treats an entry without one as damaged (it is recomputed). A
cache folder written by an earlier prolip holds valid features without that checksum; this
script adds it to every such entry (the bytes are kept as they are) and deletes the packs (they
are rebuilt from the entries on demand), so the features need not be extracted again.

It trusts the folder as the earlier version did: run it only on a cache you wrote yourself.

Run: ``.venv/bin/python scripts/upgrade_feature_cache.py build/bench-cache``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from pathlib import Path

from prolip.atomic import atomic_write

CHECKSUM = "sha256"  # the metadata key prolip.features.cache checks


def upgrade_entry(path: Path) -> bool:
    """Add the checksum to one entry lacking it; return whether the file was rewritten."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    meta = header.setdefault("__metadata__", {})
    if CHECKSUM in meta:
        return False
    meta[CHECKSUM] = hashlib.sha256(data).hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    atomic_write(path, [struct.pack("<Q", len(text)) + text, data])
    return True


def main() -> None:
    """Upgrade every entry under the cache root given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the cache folder (--cache-dir of prolip bench)")
    root = parser.parse_args().root
    upgraded = kept = 0
    for path in sorted(root.glob("v*/*/entries/*/*.safetensors")):
        if upgrade_entry(path):
            upgraded += 1
        else:
            kept += 1
    for pack in root.glob("v*/*/packs/*"):
        pack.unlink()
    print(f"{root}: {upgraded} entries given their checksum, {kept} had one; packs deleted (rebuilt on demand)")


if __name__ == "__main__":
    main()
