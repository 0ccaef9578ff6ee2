"""The disk tier's block files: what is written reads back bit for bit; anything short, long,
renamed or altered is refused, and the disk tier then forgets the block."""

from pathlib import Path

import pytest
import torch

from services.engine.kv_tier_files import (
    BlockFileError,
    block_path,
    list_block_files,
    read_block_file,
    write_block_file,
)
from services.engine.kv_tiers import DiskTier

SHAPE = (2, 2, 16, 3, 8)  # [layers, K/V, block_size, kv_heads, head_dim]
BLOCK_BYTES = 2 * 2 * 16 * 3 * 8 * 2  # bfloat16


def _block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_a_written_block_reads_back_exactly(tmp_path: Path):
    block = _block(1)
    write_block_file(tmp_path, 0xABC, block)
    raw = read_block_file(tmp_path, 0xABC, BLOCK_BYTES)
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(SHAPE), block)
    assert list_block_files(tmp_path) == [0xABC]


@pytest.mark.parametrize("damage", ["truncate", "extend", "flip_payload", "flip_header", "rename"])
def test_a_damaged_file_is_refused(tmp_path: Path, damage: str):
    write_block_file(tmp_path, 7, _block(2))
    path = block_path(tmp_path, 7)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    elif damage == "extend":
        raw += b"\0"
    elif damage == "flip_payload":
        raw[-1] ^= 0x80
    elif damage == "flip_header":
        raw[5] ^= 0x01  # inside the stored hash
    path.write_bytes(bytes(raw))
    if damage == "rename":
        path.rename(block_path(tmp_path, 8))
        with pytest.raises(BlockFileError, match="header"):
            read_block_file(tmp_path, 8, BLOCK_BYTES)
        return
    with pytest.raises(BlockFileError):
        read_block_file(tmp_path, 7, BLOCK_BYTES)


def test_disk_tier_drops_a_truncated_block_and_keeps_lru_order_across_restarts(tmp_path: Path):
    tier = DiskTier(tmp_path, 3 * BLOCK_BYTES, SHAPE, torch.bfloat16)
    for h in (1, 2, 3):
        assert tier.store(h, _block(h)) == []
    assert torch.equal(tier.load(1), _block(1))  # 1 is now the most recently used
    assert tier.store(4, _block(4)) == [2]
    tier.close()

    reopened = DiskTier(tmp_path, 3 * BLOCK_BYTES, SHAPE, torch.bfloat16)
    assert set(reopened.index) == {1, 3, 4}
    path = block_path(tmp_path, 3)
    path.write_bytes(path.read_bytes()[: BLOCK_BYTES // 2])
    assert reopened.load(3) is None
    assert 3 not in reopened and reopened.dropped_corrupt == 1
    assert torch.equal(reopened.load(4), _block(4))
    reopened.close()
    assert not path.exists()
    # A smaller budget on restart trims the least recently used files (4 was read last).
    trimmed = DiskTier(tmp_path, BLOCK_BYTES, SHAPE, torch.bfloat16)
    assert list(trimmed.index) == [4]
    trimmed.close()
