"""The decision: compare what users get with the targets, and each pool with what the
forecast load needs of it; move, add or remove at most one worker; then wait a cooldown.

Which pool is short: prefill when TTFT p90 is over its target while prompts go to prefill
workers (they have a queue, or prompts are long enough to be sent there), or when the forecast
needs a whole prefill worker more than there are; decode when ITL p90 is over target, when TTFT
is over while prompts are prefilled on decode workers, or when the forecast needs a whole decode
worker more.

Why it does not flap: (1) a pool gives a worker away only while its own p90 is under target by
the hysteresis margin *and* the forecast says it still suffices with one worker less, so a move
never creates the shortage that would call it back; (2) after any decision nothing happens for
``cooldown_s``, so its effect is measured before the next; (3) one worker per decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from planner.capacity import CapacityModel, PoolNeeds
from planner.metrics_source import MetricWindow, WorkerLoad
from planner.predictor import LoadForecast

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Targets:
    ttft_p90_s: float
    itl_p90_s: float
    hysteresis: float
    cooldown_s: float
    min_workers: int
    max_workers: int


@dataclass(frozen=True)
class Decision:
    """One change to the mesh and why. ``switch``: the ``worker_ids`` become ``role`` (several at
    once when the forecast is short by several); ``add``: a new ``role`` worker; ``remove``: the
    one worker in ``worker_ids`` (a ``role`` worker) stops."""

    action: str
    role: str
    reason: str
    worker_ids: tuple[str, ...] = ()
    at_unix: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _other(role: str) -> str:
    return "decode" if role == "prefill" else "prefill"


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


@dataclass
class Assessment:
    """One look at the mesh, in the terms the decision is taken on (also what `status` shows)."""

    pools: dict[str, int]
    needs: PoolNeeds
    short: dict[str, str]  # role -> why it is short
    can_give: dict[str, bool]

    def need(self, role: str) -> float:
        return getattr(self.needs, role)


class Policy:
    def __init__(self, targets: Targets, capacity: CapacityModel) -> None:
        self.targets = targets
        self.capacity = capacity
        self.last_decision_s: float | None = None
        self.last_assessment: Assessment | None = None

    def in_cooldown(self, now_s: float) -> bool:
        return self.last_decision_s is not None and now_s - self.last_decision_s < self.targets.cooldown_s

    def assess(self, window: MetricWindow, forecast: LoadForecast) -> Assessment:
        t = self.targets
        pools = {role: len(window.pool(role)) for role in ROLES}
        decoding = sum(w.running for w in window.pool("decode"))
        needs = self.capacity.needs(forecast, decoding, window.in_flight("prefill"))
        ttft, itl = window.ttft_p90_s, window.itl_p90_s
        short: dict[str, str] = {}
        ttft_side = ""  # the pool a TTFT over target is blamed on
        if ttft is not None and ttft > t.ttft_p90_s:
            long_prompts = forecast.prompt_tokens >= self.capacity.local_prefill_tokens
            ttft_side = "prefill" if long_prompts or window.waiting("prefill") > 0 else "decode"
            short[ttft_side] = (f"TTFT p90 {_fmt_s(ttft)} > target {_fmt_s(t.ttft_p90_s)} "
                                f"({window.in_flight(ttft_side)} in flight on {ttft_side})")  # fmt: skip
        # A saturated prefill pool spills prompts onto decode workers (the router prefills them
        # there), whose steps then stall their streams: that slow ITL is the prefill pool's.
        spill = ttft_side == "prefill" and window.waiting("prefill") > 0
        if itl is not None and itl > t.itl_p90_s and not spill:
            short.setdefault("decode", f"ITL p90 {_fmt_s(itl)} > target {_fmt_s(t.itl_p90_s)}")
        for role in ROLES:
            if role not in short and needs_more(getattr(needs, role), pools[role]):
                short[role] = (f"forecast {forecast.request_rate:.2f} req/s × {forecast.prompt_tokens:.0f}/"
                               f"{forecast.output_tokens:.0f} tokens needs {getattr(needs, role):.1f} {role} "
                               f"workers, {pools[role]} run")  # fmt: skip
        # A pool is comfortable when the latency it answers for is under target by the margin
        # (TTFT counts against a pool only if it is not blamed on the other).
        ttft_ok = ttft is None or ttft < t.ttft_p90_s * (1 - t.hysteresis)
        itl_ok = itl is None or itl < t.itl_p90_s * (1 - t.hysteresis)
        comfortable = {
            "prefill": ttft_ok or (ttft_side == "decode" and window.waiting("prefill") == 0),
            "decode": (itl_ok or spill) and (ttft_ok or ttft_side == "prefill"),
        }
        # The forecast lags (the router counts a request when it ends); a prefill pool whose every
        # worker has work in flight is busy now, whatever the forecast says.
        idle_prefill = window.in_flight("prefill") < pools["prefill"]
        can_give = {role: pools[role] > 1 and comfortable[role] and role not in short
                    and getattr(needs, role) <= pools[role] - 1 and (role == "decode" or idle_prefill)
                    for role in ROLES}  # fmt: skip
        return Assessment(pools, needs, short, can_give)

    def decide(self, window: MetricWindow, forecast: LoadForecast, now_s: float) -> Decision | None:
        """At most one decision; None in cooldown or when nothing needs doing. The assessment
        behind it is kept in ``last_assessment`` (exported as metrics)."""
        self.last_assessment = a = self.assess(window, forecast)
        if self.in_cooldown(now_s):
            return None
        decision = self._choose(a, window)
        if decision is not None:
            self.last_decision_s = now_s
        return decision

    def _choose(self, a: Assessment, window: MetricWindow) -> Decision | None:
        t = self.targets
        total = sum(a.pools.values())
        if len(a.short) == 2:
            if total >= t.max_workers:
                return None  # both short and no room: moving a worker would only move the pain
            role = max(ROLES, key=lambda r: a.need(r) - a.pools[r])
            return Decision("add", role, f"both pools short ({a.short['prefill']}; {a.short['decode']}); "
                                         f"{total} < max {t.max_workers} workers")  # fmt: skip
        if len(a.short) == 1:
            role = next(iter(a.short))
            donor = _other(role)
            if a.can_give[donor]:
                moved = _least_loaded(window.pool(donor), _switch_count(a, role, donor))
                return Decision("switch", role, f"{a.short[role]}; {donor} pool can spare {len(moved)} "
                                f"(needs {a.need(donor):.1f} of {a.pools[donor]})", moved)  # fmt: skip
            if total < t.max_workers:
                return Decision("add", role, f"{a.short[role]}; {donor} pool cannot spare one")
            return None
        if total > t.min_workers:
            for role in ROLES:
                if a.can_give[role]:
                    return Decision("remove", role, f"no pool short; {role} p90 under target by the margin and "
                                    f"needs {a.need(role):.1f} of {a.pools[role]}",
                                    _least_loaded(window.pool(role), 1))  # fmt: skip
        return None


def needs_more(need: float, have: int) -> bool:
    """A whole worker short (a fraction is left to the observed latency to call)."""
    return math.isinf(need) or need >= have + 1


def _switch_count(a: Assessment, role: str, donor: str) -> int:
    """Workers to move at once: the receiving pool's whole shortfall by the forecast, as far as
    the donor's forecast leaves it enough (at least one, which ``can_give`` guarantees): one a
    cooldown would take a phase change several cooldowns to follow."""
    shortfall = a.pools[donor] if math.isinf(a.need(role)) else math.ceil(a.need(role)) - a.pools[role]
    spare = a.pools[donor] - max(math.ceil(a.need(donor)), 1)
    return max(1, min(shortfall, spare))


def _least_loaded(pool: list[WorkerLoad], count: int) -> tuple[str, ...]:
    ranked = sorted(pool, key=lambda w: (w.running + w.waiting, w.worker_id))
    return tuple(w.worker_id for w in ranked[:count])
