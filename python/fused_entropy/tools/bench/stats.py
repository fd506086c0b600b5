"""Statistics of the bench: medians over rounds with their distribution-free intervals, ratios of
medians, and the :class:`Row` one provider's measurement at one case becomes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from .providers import Case

CONFIDENCE = 0.95
MIN_ROUNDS = 6  # the fewest samples whose median has a 95% distribution-free interval
DEFAULT_ROUNDS = 6


# ---------------------------------------------------------------------------------------------
# statistics: medians, their intervals, ratios
# ---------------------------------------------------------------------------------------------


def median_ci(times: Sequence[float], confidence: float = CONFIDENCE) -> Tuple[float, float, float]:
    """(median, low, high): the sample median and its distribution-free confidence interval
    (``scipy.stats.quantile_test(...).confidence_interval``, from order statistics)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(times, dtype=float)
    med = float(np.median(x))
    ci = stats.quantile_test(x, q=med, p=0.5).confidence_interval(confidence_level=confidence)
    return med, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Ratio:
    value: float
    low: float
    high: float
    significant: bool  # the two intervals do not overlap

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}-{self.high:.2f}]" + ("" if self.significant else " ns")


def ratio(a: "Row", b: "Row") -> Ratio:
    (ma, la, ha), (mb, lb, hb) = a.stats, b.stats
    return Ratio(ma / mb, la / hb, ha / lb, ha < lb or hb < la)


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    provider: str
    case: Case
    result: Dict = field(default_factory=dict)  # the worker's close() JSON, times_s over the rounds
    skipped: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.error and bool(self.result.get("times_s"))

    @property
    def stats(self) -> Tuple[float, float, float]:
        if "_stats" not in self.result:
            self.result["_stats"] = median_ci(self.result["times_s"])
        return self.result["_stats"]

    @property
    def time(self) -> float:
        return self.stats[0]

    @property
    def working(self) -> Optional[float]:
        w = self.result.get("working_bytes")
        return None if w is None else max(0, w) / self.case.nv_bytes
