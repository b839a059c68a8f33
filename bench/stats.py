"""Figures: several runs of one measurement, their median and spread, and the goal."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def p50(values: Sequence[float]) -> float:
    return percentile(values, 50)


def p99(values: Sequence[float]) -> float:
    return percentile(values, 99)


def _round(value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        return value
    magnitude = abs(value)
    digits = 3 if magnitude < 10 else 2 if magnitude < 100 else 1 if magnitude < 10_000 else 0
    return round(value, digits)


@dataclass(frozen=True)
class Goal:
    """A goal of issue 6 §3: the median must be at most (<=) or at least (>=) a target."""

    op: Literal["<=", ">="]
    target: float
    source: str = "issue 6 §3"

    def text(self, unit: str) -> str:
        return f"{self.op} {self.target:g} {unit}".strip()

    def evaluate(self, value: float) -> dict[str, Any]:
        """met, and when missed the shortfall (absolute, and as a % of the target)."""
        if math.isnan(value):
            return {"met": None, "miss_by": None, "miss_by_pct": None}
        met = value <= self.target if self.op == "<=" else value >= self.target
        if met:
            return {"met": True, "miss_by": 0.0, "miss_by_pct": 0.0}
        by = value - self.target if self.op == "<=" else self.target - value
        pct = 100.0 * by / self.target if self.target else math.inf
        return {"met": False, "miss_by": _round(by), "miss_by_pct": _round(pct)}


@dataclass
class Figure:
    """One measured figure: a value per run; the median is what is compared to the goal."""

    key: str
    section: str
    label: str
    unit: str
    values: list[float] = field(default_factory=list)
    goal: Goal | None = None
    note: str = ""
    headline: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan

    @property
    def spread_pct(self) -> float:
        """(max - min) / median: a wide spread says the machine was noisy."""
        if not self.values or not self.median:
            return math.nan
        return 100.0 * (self.high - self.low) / abs(self.median)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "key": self.key,
            "section": self.section,
            "label": self.label,
            "unit": self.unit,
            "median": _round(self.median),
            "min": _round(self.low),
            "max": _round(self.high),
            "spread_pct": _round(self.spread_pct),
            "runs": len(self.values),
            "values": [_round(v) for v in self.values],
            "headline": self.headline,
        }
        if self.goal is not None:
            data["goal"] = {
                "op": self.goal.op,
                "target": self.goal.target,
                "text": self.goal.text(self.unit),
                "source": self.goal.source,
            }
            data.update(self.goal.evaluate(self.median))
        else:
            data["goal"] = None
            data["met"] = None
        if self.note:
            data["note"] = self.note
        return data


@dataclass
class Results:
    """Every figure of a benchmark run, and what each section learnt on the side."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def figure(
        self,
        key: str,
        section: str,
        label: str,
        unit: str,
        *,
        goal: Goal | None = None,
        note: str = "",
        headline: bool = False,
    ) -> Figure:
        """The figure with this key, created on first use (values are appended per run)."""
        for existing in self.figures:
            if existing.key == key:
                return existing
        created = Figure(key, section, label, unit, goal=goal, note=note, headline=headline)
        self.figures.append(created)
        return created

    def detail(self, section: str) -> dict[str, Any]:
        return self.details.setdefault(section, {})
