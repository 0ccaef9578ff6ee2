"""Settings: a flag beats KVMESH_* which beats the default; bad values are refused with the rule."""

from __future__ import annotations

import argparse

import pytest

from kvmesh.config import KvStoreSettings, WorkerSettings, add_settings_arguments, settings_from_namespace


def parse(argv: list[str], env: dict[str, str], kind: type = KvStoreSettings) -> KvStoreSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, kind)
    return settings_from_namespace(kind, parser.parse_args(argv), env)


def test_flag_beats_environment_beats_default():
    env = {"KVMESH_NAMESPACE": "from-env", "KVMESH_LEASE_TTL_S": "7", "KVMESH_REDIS_URL": "redis://env:1/0"}
    settings = parse(["--namespace", "from-flag"], env)
    assert settings.namespace == "from-flag"
    assert settings.lease_ttl_s == 7
    assert settings.redis_url == "redis://env:1/0"
    assert parse([], {}).etcd_endpoint == "127.0.0.1:2379"


def test_instance_id_is_generated_and_valid():
    settings = parse([], {})
    assert settings.instance_id.startswith("kvstore-")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--namespace", "has space"], {}, "namespace"),
        (["--instance-id", "a/b"], {}, "instance id"),
        (["--lease-ttl-s", "0"], {}, "lease_ttl_s"),
        ([], {"KVMESH_PORT": "not-a-number"}, "KVMESH_PORT"),
    ],
)
def test_bad_values_are_refused_with_the_rule(argv, env, message):
    with pytest.raises(ValueError, match=message):
        parse(argv, env)


@pytest.mark.parametrize(("argv", "disk_gb"), [
    ([], 2.0), (["--device", "cuda"], 0.0), (["--device", "cuda", "--disk-cache-gb", "4"], 4.0),
    (["--disk-cache-gb", "0"], 0.0),
])
def test_the_disk_tier_is_on_by_default_on_cpu_and_off_on_cuda(argv, disk_gb):
    """On an H100 a disk block took longer to read back than to recompute (bench/reports/kv-tiers-h100)."""
    assert parse(["--instance-id", "w1", *argv], {}, WorkerSettings).disk_cache_gb == disk_gb
