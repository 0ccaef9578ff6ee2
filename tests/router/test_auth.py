"""API keys, per-key token buckets, the in-flight bound and request size limits of the router."""

from __future__ import annotations

import grpc
import pytest

from kvmesh.config import RouterSettings
from router.admission import InflightLimit
from router.auth import FrontDoorAuth
from router.errors import RouterError, retry_after_header
from router.request_limits import check_input_limits, check_max_tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_key_configured_leaves_the_door_open():
    FrontDoorAuth([]).admit(None)
    FrontDoorAuth([]).admit("Bearer anything")


@pytest.mark.parametrize("header", [None, "", "key-a", "Basic key-a", "Bearer", "Bearer key-b", "Bearer key-a2"])
def test_missing_or_wrong_keys_are_unauthenticated(header):
    with pytest.raises(RouterError) as err:
        FrontDoorAuth(["key-a", "other"]).admit(header)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.http_status == 401
    assert err.value.openai_body()["error"]["type"] == "authentication_error"


def test_any_configured_key_is_accepted_whatever_the_scheme_case():
    auth = FrontDoorAuth(["key-a", "key-b"])
    auth.admit("Bearer key-a")
    auth.admit("bearer key-b")


def test_each_key_has_its_own_token_bucket():
    clock = FakeClock()
    auth = FrontDoorAuth(["key-a", "key-b"], rate_per_s=0.5, burst=2, clock=clock)
    auth.admit("Bearer key-a")
    auth.admit("Bearer key-a")
    with pytest.raises(RouterError) as err:
        auth.admit("Bearer key-a")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.http_status == 429
    assert err.value.retry_after_s == pytest.approx(2.0)
    auth.admit("Bearer key-b")  # another key is not slowed by key-a's burst
    auth.admit("Bearer key-a", rate_limited=False)  # listing models does not count
    clock.now += 2.0
    auth.admit("Bearer key-a")
    with pytest.raises(RouterError):
        auth.admit("Bearer key-a")


def test_retry_after_is_whole_seconds_and_never_zero():
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(2.0) == "2"
    assert retry_after_header(2.1) == "3"


def test_inflight_limit_refuses_beyond_the_bound_and_release_is_idempotent():
    limit = InflightLimit(2)
    first, second = limit.acquire(), limit.acquire()
    with pytest.raises(RouterError) as err:
        limit.acquire()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after_s
    first.release()
    first.release()
    assert limit.inflight == 1
    limit.acquire()
    second.release()
    assert limit.inflight == 1 and limit.refused == 1


def test_request_limits_name_the_limit():
    settings = RouterSettings(max_messages=2, max_prompt_tokens=3, max_output_tokens=10)
    check_input_limits(settings, [{}, {}], [1, 2, 3])
    check_max_tokens(settings, 10)
    for check, param in [(lambda: check_input_limits(settings, [{}] * 3, None), "messages"),
                         (lambda: check_input_limits(settings, None, [1] * 4), "prompt"),
                         (lambda: check_max_tokens(settings, 11), "max_tokens")]:  # fmt: skip
        with pytest.raises(RouterError) as err:
            check()
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.param == param
