"""A worker's default disk tier, when no later worker could find it again, is scratch: removed
at a graceful stop, or by a later worker once its owner has died; other directories stay."""

import subprocess
import sys
from pathlib import Path

from kvmesh.config import SCRATCH_DISK_CACHE_ROOT, WorkerSettings
from services.worker.scratch_dir import ScratchDir, sweep_dead


def test_only_the_default_dir_of_a_generated_id_is_scratch(tmp_path: Path):
    bare = WorkerSettings()
    assert bare.disk_cache_is_scratch
    assert Path(bare.disk_cache_dir) == Path(SCRATCH_DISK_CACHE_ROOT) / bare.instance_id
    named = WorkerSettings(instance_id="worker-a")
    assert not named.disk_cache_is_scratch  # a restart under the same id finds its blocks
    assert Path(named.disk_cache_dir) == Path(SCRATCH_DISK_CACHE_ROOT) / "worker-a"
    assert not WorkerSettings(disk_cache_dir=str(tmp_path)).disk_cache_is_scratch


def test_a_sweep_removes_scratch_dirs_of_dead_owners_only(tmp_path: Path):
    alive = ScratchDir(tmp_path / "alive")
    (alive.path / "block.kvb").write_bytes(b"x")
    kept = tmp_path / "given"  # a directory given by flag: no marker
    kept.mkdir()
    # A worker that died without stopping: its process claimed a directory and exited.
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from services.worker.scratch_dir import ScratchDir; ScratchDir(Path(sys.argv[1]))",
                    str(tmp_path / "dead")], check=True, cwd=Path(__file__).parents[2])
    assert (tmp_path / "dead").is_dir()

    assert sweep_dead(tmp_path) == [tmp_path / "dead"]

    assert not (tmp_path / "dead").exists()
    assert (alive.path / "block.kvb").exists() and kept.is_dir()
    alive.remove()
    assert not alive.path.exists()
    assert sweep_dead(tmp_path / "missing") == []
