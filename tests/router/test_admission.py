"""A request the router refuses at admission (its in-flight bound) still ends its trace: it is
counted in the metrics and shown on the dashboard, like any other finished request."""

from __future__ import annotations

import grpc
import pytest

from kvmesh.config import RouterSettings
from router import metrics
from router.errors import RouterError
from router.pipeline import GenerationInput, RouterCore


async def test_a_request_refused_at_admission_is_counted_and_recorded():
    # The refusal comes before any worker or index is consulted, so none is needed.
    core = RouterCore(RouterSettings(max_inflight_requests=1, metrics_port=-1), pool=None, kv_index=None)
    core.admission.acquire()  # the one slot is taken
    refused = metrics.REQUESTS.labels("resource_exhausted", "kv", "none")
    before = refused._value.get()
    with pytest.raises(RouterError) as err:
        await core.open(GenerationInput(prompt="hello"))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused._value.get() == before + 1
    assert core.recent.by_status["resource_exhausted"] == 1
    assert core.admission.inflight == 1  # the refused request held no slot
