"""How long one forward pass takes, as an affine function of the batch's shape.

The mock engine sleeps for this instead of computing, so a worker's latency under load
(queueing, batching, prefix hits saving prefill) behaves like the real engine's. One step is
modelled, whatever its mix of prefill chunks and decode rows, as

    seconds = base + per_decode_seq × decode_seqs + per_decode_context_token × decode_context
              + per_prefill_token × prefill_tokens + per_prefill_attention_pair × prefill_attention

``decode_context`` is the sum of the decode rows' context lengths (the KV read per step);
``prefill_attention`` counts the query-key pairs of the prefill chunks (a chunk of ``n`` new
tokens after ``c`` cached ones attends over about ``n × (c + n/2)`` pairs), which is how a cached
prefix still costs something: its KV is read, not recomputed. Five coefficients, fitted by
non-negative least squares from measured steps (``kvmesh calibrate``), are enough to keep the
real engine's step times within the test's tolerance on the shapes measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.engine.scheduler import ScheduledItem

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "cpu-smollm2"
COEFFICIENTS = ("base", "per_decode_seq", "per_decode_context_token", "per_prefill_token",
                "per_prefill_attention_pair")  # fmt: skip


@dataclass(frozen=True)
class StepShape:
    """What a forward pass has to do, in the terms the timing model prices."""

    decode_seqs: int = 0
    decode_context: int = 0
    prefill_tokens: int = 0
    prefill_attention: int = 0

    def features(self) -> list[float]:
        return [1.0, self.decode_seqs, self.decode_context, self.prefill_tokens, self.prefill_attention]


def prefill_pairs(new_tokens: int, cached_tokens: int) -> int:
    """Attention (query, key) pairs of a causal prefill of ``new_tokens`` after ``cached_tokens``."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2


def step_shape(items: Sequence[ScheduledItem]) -> StepShape:
    """The shape of a scheduled batch (read before the step advances ``num_computed_tokens``)."""
    decode_seqs = decode_context = prefill_tokens = prefill_attention = 0
    for seq, n in items:
        start = seq.num_computed_tokens
        if n == 1:
            decode_seqs += 1
            decode_context += start + 1
        else:
            prefill_tokens += n
            prefill_attention += prefill_pairs(n, start)
    return StepShape(decode_seqs, decode_context, prefill_tokens, prefill_attention)


@dataclass
class TimingProfile:
    """Fitted coefficients (seconds) and where they came from (``source``: measured or roofline)."""

    name: str
    source: str
    description: str
    coefficients: dict[str, float]
    meta: dict = field(default_factory=dict)

    def predict(self, shape: StepShape) -> float:
        """Seconds one forward pass of ``shape`` takes."""
        return max(0.0, sum(self.coefficients[k] * x for k, x in zip(COEFFICIENTS, shape.features(), strict=True)))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, name_or_path: str) -> TimingProfile:
        """A shipped profile by name (``cpu-smollm2``, ``h100-llama3-8b``, …) or a JSON file's path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = PROFILES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
            raise ValueError(f"timing profile {name_or_path!r} not found; shipped: {', '.join(shipped)}")
        data = json.loads(path.read_text())
        missing = set(COEFFICIENTS) - set(data.get("coefficients", {}))
        if missing:
            raise ValueError(f"{path}: profile lacks coefficients {sorted(missing)}")
        return cls(data["name"], data["source"], data.get("description", ""), data["coefficients"],
                   data.get("meta", {}))  # fmt: skip


def fit_coefficients(samples: Iterable[tuple[StepShape, float]]) -> dict[str, float]:
    """Non-negative least squares on relative error: every coefficient is a cost, so a negative
    fit (noise trading one feature against another) is dropped and the rest refitted. Rows are
    weighted by 1/time so a 5 ms decode step counts as much as a 500 ms prefill."""
    rows, times = zip(*((s.features(), t) for s, t in samples), strict=True)
    x, y = np.asarray(rows, dtype=float), np.asarray(times, dtype=float)
    w = 1.0 / np.maximum(y, 1e-6)
    active = [i for i in range(x.shape[1]) if x[:, i].any()]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if coef.min() >= 0 or len(active) == 1:
            break
        del active[int(coef.argmin())]
    values = dict.fromkeys(COEFFICIENTS, 0.0)
    for i, c in zip(active, coef, strict=True):
        values[COEFFICIENTS[i]] = max(float(c), 0.0)
    return values
