"""A small OTLP/gRPC trace collector that writes every span it receives as one JSON line.

It is the sink `kvmesh bench serve --tracing-compare` exports to (so export costs what it
costs against a live collector, with no retries) and the span store the observability tests
read traces from. It runs as its own process (``python -m bench.otlp_sink PORT FILE``): a
gRPC server's threads in the process that forks the services would break those forks.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from kvmesh.local_stores import free_port


def _value(value: common_pb2.AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class _SpanWriter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out: Path) -> None:
        self._out = out.open("a")
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
               ) -> trace_service_pb2.ExportTraceServiceResponse:  # fmt: skip
        lines = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(json.dumps({
                        "service": resource.get("service.name", ""),
                        "instance": resource.get("service.instance.id", ""), "name": span.name,
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                    }))  # fmt: skip
        with self._lock:
            self._out.write("".join(line + "\n" for line in lines))
            self._out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink:
    """The collector process, started on a free port; spans are read back from its file."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.out.touch()
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(self.port), str(out)])
        deadline = time.monotonic() + 60
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the OTLP sink did not start (exit {self.proc.poll()})")
            time.sleep(0.1)

    def _listening(self) -> bool:
        # A plain socket, not a gRPC channel: gRPC threads in this process would break later forks.
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spans(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.endswith("}")]

    def trace(self, trace_id: str) -> list[dict]:
        return [span for span in self.spans() if span["trace_id"] == trace_id]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main(argv: list[str]) -> None:
    port, out = int(argv[0]), Path(argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_SpanWriter(out), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main(sys.argv[1:])
