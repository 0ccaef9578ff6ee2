"""The load predictor: Holt's linear trend over request rate and prompt / answer lengths, so
the planner sizes the pools for the load a cooldown from now, not for the queue already grown."""

from __future__ import annotations

from dataclasses import dataclass

from planner.metrics_source import MetricWindow


class HoltTrend:
    """Double exponential smoothing: a level and a per-step trend; forecasts never go below 0."""

    def __init__(self, smoothing: float, trend: float) -> None:
        self.smoothing = smoothing
        self.trend_weight = trend
        self.level: float | None = None
        self.trend = 0.0

    def update(self, value: float) -> None:
        if self.level is None:
            self.level = value
            return
        previous = self.level
        self.level = self.smoothing * value + (1 - self.smoothing) * (previous + self.trend)
        self.trend = self.trend_weight * (self.level - previous) + (1 - self.trend_weight) * self.trend

    def forecast(self, steps: float) -> float:
        return max((self.level or 0.0) + steps * self.trend, 0.0)


@dataclass(frozen=True)
class LoadForecast:
    request_rate: float
    prompt_tokens: float
    output_tokens: float


class LoadPredictor:
    """One Holt series per load figure, fed once per planner tick."""

    def __init__(self, smoothing: float, trend: float) -> None:
        self.rate = HoltTrend(smoothing, trend)
        self.prompt = HoltTrend(smoothing, trend)
        self.output = HoltTrend(smoothing, trend)

    def observe(self, window: MetricWindow) -> None:
        self.rate.update(window.request_rate)
        # Lengths only move when requests finished: an idle tick says nothing about them.
        if window.request_rate > 0:
            self.prompt.update(window.mean_prompt_tokens)
            self.output.update(window.mean_output_tokens)

    def forecast(self, steps: float) -> LoadForecast:
        return LoadForecast(self.rate.forecast(steps), self.prompt.forecast(steps), self.output.forecast(steps))
