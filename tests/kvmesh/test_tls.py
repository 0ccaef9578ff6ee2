"""TLS and mutual TLS on the mesh's gRPC hops, and the mesh-peer check of mesh-only endpoints.

In-process servers test the credentials and the guard (health stands in for a mesh-only
service); a `kvmesh up --tls` stack then serves a request end to end over mutual TLS.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

import kvmesh
from kvmesh import tls
from kvmesh.certs import CA_FILE, cert_paths, write_certs
from kvmesh.grpc_service import mesh_channel
from kvmesh.local_stores import child_env, free_port
from tests.kvmesh.test_local_stack import kvmesh as kvmesh_cmd
from tests.kvmesh.test_local_stack import wait_for_line

GUARDED = ("/grpc.health.v1.Health/",)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_certs(out)
    return out


@pytest.fixture
def reset_tls() -> Iterator[None]:
    yield
    tls.configure(None)


async def serve_health(config: tls.TlsConfig | None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[tls.MeshPeerGuard(GUARDED)])
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = (server.add_secure_port("127.0.0.1:0", config.server_credentials()) if config
            else server.add_insecure_port("127.0.0.1:0"))  # fmt: skip
    await server.start()
    return server, f"127.0.0.1:{port}"


async def check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


def credentials(cert_dir: Path, service: str | None, ca_dir: Path | None = None) -> grpc.ChannelCredentials:
    ca = ((ca_dir or cert_dir) / CA_FILE).read_bytes()
    if service is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    cert, key = cert_paths(cert_dir, service)
    return grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())


async def test_mutual_tls_admits_mesh_certificates_only(certs, tmp_path, reset_tls):
    tls.configure(tls.TlsConfig.for_service(certs, "worker"))
    server, address = await serve_health(tls.active())
    stranger = tmp_path / "other-ca"
    write_certs(stranger)
    try:
        outcomes = {}
        for name, creds in [("no certificate", credentials(certs, None)),
                            ("another CA's certificate", credentials(stranger, "worker", ca_dir=certs)),
                            ("client certificate", credentials(certs, "client")),
                            ("worker certificate", credentials(certs, "worker"))]:  # fmt: skip
            async with grpc.aio.secure_channel(address, creds) as channel:
                outcomes[name] = await check(channel)
        async with grpc.aio.insecure_channel(address) as channel:
            outcomes["plaintext"] = await check(channel)
        async with mesh_channel(address) as channel:  # this process's own identity
            outcomes["mesh_channel"] = await check(channel)
    finally:
        await server.stop(0)
    assert outcomes == {
        "no certificate": grpc.StatusCode.UNAVAILABLE,  # the handshake fails: nothing is served
        "another CA's certificate": grpc.StatusCode.UNAVAILABLE,
        "client certificate": grpc.StatusCode.PERMISSION_DENIED,  # a valid client, not a mesh peer
        "worker certificate": grpc.StatusCode.OK,
        "plaintext": grpc.StatusCode.UNAVAILABLE,
        "mesh_channel": grpc.StatusCode.OK,
    }


async def test_without_tls_the_mesh_token_guards_mesh_only_endpoints(reset_tls):
    tls.configure(None, mesh_token="s3cret")
    server, address = await serve_health(None)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            assert await check(channel) == grpc.StatusCode.PERMISSION_DENIED
        async with mesh_channel(address) as channel:  # sends the token
            assert await check(channel) == grpc.StatusCode.OK
    finally:
        await server.stop(0)


@pytest.mark.slow
def test_up_with_tls_serves_over_mutual_tls(tmp_path: Path):
    state_dir = tmp_path / "state"
    grpc_port = free_port()
    up = subprocess.Popen(
        kvmesh_cmd("up", "--tls", "--namespace", "tls", "--state-dir", str(state_dir), "--model", "random:tiny",
                   "--grpc-port", str(grpc_port), "--http-port", str(free_port())),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
    )  # fmt: skip
    try:
        wait_for_line(up, "all services healthy", timeout_s=240)  # health checks themselves ran over mTLS
        status = subprocess.run(kvmesh_cmd("status", "--json", "--state-dir", str(state_dir)),
                                capture_output=True, text=True, timeout=60, env=child_env())  # fmt: skip
        assert all(row["healthy"] for row in json.loads(status.stdout)), status.stdout
        certs = state_dir / "certs"
        cert, key = cert_paths(certs, "client")
        address = f"127.0.0.1:{grpc_port}"
        with kvmesh.Client(address, timeout=60, tls=True, root_certificates=(certs / CA_FILE).read_bytes(),
                           private_key=key.read_bytes(), certificate_chain=cert.read_bytes()) as client:  # fmt: skip
            assert len(client.generate("Hello", max_tokens=3).token_ids) == 3
        with kvmesh.Client(address, timeout=10, retries=0, tls=True,
                           root_certificates=(certs / CA_FILE).read_bytes()) as client:  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Hello", max_tokens=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with kvmesh.Client(address, timeout=10, retries=0) as client, pytest.raises(grpc.RpcError):
            client.generate("Hello", max_tokens=3)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
