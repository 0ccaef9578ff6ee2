"""The one telemetry setup: metrics server on a free port or off, settings validation, and the
off path costing no span recording and no gRPC metadata."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.config import RouterSettings, WorkerSettings, load_settings
from kvmesh.telemetry import outgoing_metadata, setup_telemetry, start_span, tracing_enabled


def test_metrics_served_on_a_free_port_and_parseable():
    telemetry = setup_telemetry("test", "127.0.0.1", 0, "off", "", 1.0)
    try:
        assert telemetry.metrics_port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{telemetry.metrics_port}/metrics", timeout=5) as response:
            families = {f.name for f in text_string_to_metric_families(response.read().decode())}
        assert "process_cpu_seconds" in families or "python_info" in families
    finally:
        telemetry.shutdown()


def test_metrics_port_minus_one_serves_nothing():
    assert setup_telemetry("test", "127.0.0.1", -1, "off", "", 1.0).metrics_port == 0


def test_tracing_off_records_nothing_and_sends_no_metadata():
    assert not tracing_enabled()
    span = start_span("generate", attributes={"gen_ai.request.model": "m"})
    assert not span.is_recording()
    assert outgoing_metadata(span) is None and outgoing_metadata() is None


@pytest.mark.parametrize("argv", [["--trace-exporter", "jaeger"], ["--trace-sample-ratio", "1.5"],
                                  ["--metrics-port", "-2"]])  # fmt: skip
def test_bad_telemetry_settings_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        load_settings(WorkerSettings, argv)
    assert "must" in capsys.readouterr().err


def test_every_service_takes_the_telemetry_flags():
    settings = load_settings(RouterSettings, ["--trace-exporter", "otlp", "--otlp-endpoint", "jaeger:4317",
                                              "--trace-sample-ratio", "0.1", "--metrics-port", "9100"])  # fmt: skip
    assert (settings.trace_exporter, settings.otlp_endpoint, settings.trace_sample_ratio, settings.metrics_port) == (
        "otlp", "jaeger:4317", 0.1, 9100)
