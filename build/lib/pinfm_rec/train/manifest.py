"""The COMPLETE marker of a checkpoint: written last, it lists every file with its size and CRC-32.

``COMPLETE`` (JSON)::

    {"step": 200, "run_id": "3f2c...", "files": {".metadata": {"size": 1234, "crc32": 305419896}, ...}}

A checkpoint is used only if its marker exists and every listed file has the listed size and
checksum (``verify``). The sums are computed by the ranks that just wrote the files (each rank
sums every W-th file of the directory, from the page cache: ~1-2 GB/s per rank with zlib's CRC-32)
and merged by rank 0. A marker from before manifests (``step N``) is accepted unverified.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Dict, Optional

MARKER = "COMPLETE"
_PART = ".manifest_rank{}.json"
_CHUNK = 8 << 20


def file_sum(path: str) -> Dict[str, int]:
    """{"size": bytes, "crc32": CRC-32 of the whole file}."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            crc = zlib.crc32(buf, crc)
            size += len(buf)
    return {"size": size, "crc32": crc}


def _payload_names(dirpath: str) -> list:
    return sorted(n for n in os.listdir(dirpath) if n != MARKER and not n.startswith(".manifest_rank"))


def write_part(dirpath: str, rank: int, world: int) -> None:
    """Sum this rank's share (every ``world``-th file) of ``dirpath`` into a part file for rank 0."""
    part = {n: file_sum(os.path.join(dirpath, n)) for n in _payload_names(dirpath)[rank::world]}
    with open(os.path.join(dirpath, _PART.format(rank)), "w") as f:
        json.dump(part, f)


def write_marker(dirpath: str, world: int, meta: dict) -> None:
    """Rank 0, after every rank's ``write_part`` (and a barrier): merge the parts, sum the files
    written since (not yet in any part), remove the parts and write the marker, fsynced."""
    files: Dict[str, dict] = {}
    for r in range(world):
        p = os.path.join(dirpath, _PART.format(r))
        with open(p) as f:
            files.update(json.load(f))
        os.remove(p)
    for n in _payload_names(dirpath):
        if n not in files:
            files[n] = file_sum(os.path.join(dirpath, n))
    with open(os.path.join(dirpath, MARKER), "w") as f:
        json.dump({**meta, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_marker(dirpath: str) -> Optional[dict]:
    """The marker's content; {} for a pre-manifest marker; {"damaged": True} for an unreadable
    manifest; None when there is none."""
    p = os.path.join(dirpath, MARKER)
    try:
        with open(p) as f:
            text = f.read()
    except OSError:
        return None
    if not text.lstrip().startswith("{"):
        return {}  # a pre-manifest marker ("step N")
    try:
        out = json.loads(text)
    except ValueError:
        out = None
    # a damaged manifest is not a pre-manifest marker: verify() must not accept it unchecked
    return out if isinstance(out, dict) else {"damaged": True}


def verify(dirpath: str) -> Optional[str]:
    """None when ``dirpath`` is a complete, intact checkpoint; else why not (for a warning)."""
    marker = read_marker(dirpath)
    if marker is None:
        return "no COMPLETE marker (a save that did not finish)"
    if marker.get("damaged"):
        return f"its {MARKER} manifest is damaged (not valid JSON)"
    for name, want in sorted((marker.get("files") or {}).items()):
        p = os.path.join(dirpath, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']} (truncated or rewritten)"
        if file_sum(p)["crc32"] != want["crc32"]:
            return f"{name}: CRC-32 differs from the manifest (corrupted)"
    return None
