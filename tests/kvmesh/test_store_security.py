"""Redis AUTH, etcd authentication and etcd TLS, through the settings every service reads: a real
redis-server started with --requirepass, a real etcd with auth enabled (by etcdctl), a real etcd
serving only TLS with client certificates of our CA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError, RedisError

from kvmesh.certs import CA_FILE, cert_paths, write_certs
from kvmesh.config import KvStoreSettings
from kvmesh.discovery import Discovery, EtcdAccess
from kvmesh.local_stores import etcd_binary, start_etcd, start_redis
from kvstore.registry import BlockRegistry
from kvstore.server import redis_client
from tests.kvmesh.test_discovery import worker_info

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    base = tmp_path_factory.mktemp("redis-auth")
    store = start_redis(base / "data", base / "redis.log", password=PASSWORD)
    yield store
    store.stop()


async def _stats(settings: KvStoreSettings):
    client = redis_client(settings)
    try:
        return await BlockRegistry(client, "auth").stats()
    finally:
        await client.aclose()


@pytest.mark.parametrize("how", ["setting", "url"])
async def test_the_kvstore_authenticates_to_redis(redis_with_password, how):
    url = f"redis://{redis_with_password.endpoint}/0"
    settings = (KvStoreSettings(redis_url=url, redis_password=PASSWORD, metrics_port=-1) if how == "setting"
                else KvStoreSettings(redis_url=f"redis://:{PASSWORD}@{redis_with_password.endpoint}/0"))  # fmt: skip
    assert (await _stats(settings)).blocks == 0


@pytest.mark.parametrize("password", ["", "wrong"])
async def test_redis_refuses_the_kvstore_without_the_password(redis_with_password, password):
    settings = KvStoreSettings(redis_url=f"redis://{redis_with_password.endpoint}/0", redis_password=password)
    with pytest.raises(RedisError) as err:
        await _stats(settings)
    assert isinstance(err.value, AuthenticationError) or "NOAUTH" in str(err.value)


async def _register_and_list(discovery: Discovery) -> set[str]:
    registration = await discovery.register(worker_info("secured"), ttl_s=5)
    try:
        return set(await discovery.list("worker"))
    finally:
        await registration.close()
        await discovery.close()


async def test_etcd_authentication_by_user_and_password(tmp_path, namespace):
    etcd = start_etcd(tmp_path / "data", tmp_path / "etcd.log")
    try:
        etcdctl = [str(Path(etcd_binary()).with_name("etcdctl")), f"--endpoints={etcd.endpoint}"]
        subprocess.run([*etcdctl, "user", "add", f"root:{PASSWORD}"], check=True, capture_output=True)
        subprocess.run([*etcdctl, "auth", "enable"], check=True, capture_output=True)
        access = EtcdAccess(username="root", password=PASSWORD)
        assert await _register_and_list(Discovery(etcd.endpoint, namespace, access)) == {"secured"}
        with pytest.raises(Exception, match="user name is empty"):
            await Discovery(etcd.endpoint, namespace).list()
    finally:
        etcd.stop()


async def test_etcd_over_tls_with_a_client_certificate(tmp_path, namespace):
    certs = tmp_path / "certs"
    write_certs(certs)
    etcd = start_etcd(tmp_path / "data", tmp_path / "etcd.log", tls=(certs / CA_FILE, *cert_paths(certs, "kvstore")))
    try:
        cert, key = cert_paths(certs, "worker")
        access = EtcdAccess(ca=str(certs / CA_FILE), cert=str(cert), key=str(key))
        assert await _register_and_list(Discovery(etcd.endpoint, namespace, access)) == {"secured"}
        plaintext = Discovery(etcd.endpoint, namespace)
        with pytest.raises(Exception):  # noqa: B017 - a plaintext client gets no answer at all
            await plaintext.list()
        await plaintext.close()
    finally:
        etcd.stop()
