"""The on-disk form of one KV block (tier G3): a small checksummed header, then raw bytes.

``<hash as 16 hex digits>.kvb`` = magic ``KVB1`` | u64le block hash | u64le payload length |
u64le xxh3_64 of the payload | payload (the block's ``[layers, 2, block_size, heads, dim]``
tensor, little-endian raw bytes). The directory is per model, dtype and block size, so the
length and the name are all a reader needs to trust the bytes: a file that is short, long,
renamed or altered fails its check and is never loaded. Files are written to a temporary
name and renamed, so a crash mid-write leaves no half block under a real name.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import torch
import xxhash

from services.engine.kv_transfer import tensor_pieces

_MAGIC = b"KVB1"
_HEADER = struct.Struct("<4sQQQ")
_SUFFIX = ".kvb"


class BlockFileError(ValueError):
    """A block file that is missing or fails its checks."""


def block_path(directory: Path, block_hash: int) -> Path:
    return directory / f"{block_hash:016x}{_SUFFIX}"


def write_block_file(directory: Path, block_hash: int, block: torch.Tensor) -> None:
    pieces = tensor_pieces(block)
    digest = xxhash.xxh3_64()
    for piece in pieces:
        digest.update(piece)
    length = sum(piece.nbytes for piece in pieces)
    final = block_path(directory, block_hash)
    temporary = final.with_suffix(".tmp")
    with open(temporary, "wb") as f:
        f.write(_HEADER.pack(_MAGIC, block_hash, length, digest.intdigest()))
        for piece in pieces:
            f.write(piece)
    os.replace(temporary, final)


def read_block_file(directory: Path, block_hash: int, expected_bytes: int) -> bytes:
    """The payload of a block's file, checked against its name, length and checksum."""
    try:
        raw = block_path(directory, block_hash).read_bytes()
    except OSError as exc:
        raise BlockFileError(f"unreadable: {exc}") from None
    if len(raw) != _HEADER.size + expected_bytes:
        raise BlockFileError(f"{len(raw)} bytes, a block file has {_HEADER.size + expected_bytes}")
    magic, stored_hash, length, checksum = _HEADER.unpack_from(raw)
    payload = memoryview(raw)[_HEADER.size:]
    if magic != _MAGIC or stored_hash != block_hash or length != expected_bytes:
        raise BlockFileError("header does not match the file's name or this pool's block size")
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise BlockFileError("checksum mismatch")
    return raw[_HEADER.size:]


def list_block_files(directory: Path) -> list[int]:
    """Hashes of the block files in ``directory``, least recently written first (the LRU order
    a restarted worker resumes with); leftover temporary files are deleted."""
    found: list[tuple[float, int]] = []
    for entry in os.scandir(directory):
        name = entry.name
        if name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
            continue
        stem = name.removesuffix(_SUFFIX)
        if name.endswith(_SUFFIX) and len(stem) == 16:
            with contextlib.suppress(ValueError, OSError):
                found.append((entry.stat().st_mtime, int(stem, 16)))
    return [block_hash for _, block_hash in sorted(found)]


def remove_block_file(directory: Path, block_hash: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        block_path(directory, block_hash).unlink()


def touch_block_file(directory: Path, block_hash: int) -> None:
    """Mark a block as just used, so a restarted worker's LRU order (by mtime) keeps it longest."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(block_path(directory, block_hash))
