"""A tiny Prometheus registry: counters and gauges with labels, text exposition.

Why not ``prometheus_client``: relayd needs two metric kinds and one output
format; about a hundred lines keep relayd free of a dependency and of its
process-global default registry (tests run several relays in one process).

Rules it keeps
--------------
- Label names are fixed when a metric is made; label values are bounded:
  each metric keeps at most ``max_label_sets`` series, and any further label
  set is folded into one series whose every label is ``"_overflow"``. No
  value a peer chooses can grow memory.
- Label values are escaped as the format requires (``\\``, ``"``, newline).
- Gauges may be computed at scrape time (``Gauge.set_function``).

Wire format (Prometheus text exposition 0.0.4), ``GET /metrics``::

    <- # HELP relayd_stun_responses_total STUN responses sent.
       # TYPE relayd_stun_responses_total counter
       relayd_stun_responses_total{port="main",kind="success"} 3
"""

from __future__ import annotations

from collections.abc import Callable

from relayd import defaults

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OVERFLOW = "_overflow"

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class _Metric:
    kind = ""

    def __init__(
        self, name: str, help_text: str, labels: tuple[str, ...], max_label_sets: int
    ) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = labels
        self.max_label_sets = max_label_sets
        self._values: dict[LabelValues, float] = {}
        if not labels:
            self._values[()] = 0.0

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        key = tuple(labels[name] for name in self.label_names)
        if key not in self._values and len(self._values) >= self.max_label_sets:
            key = (OVERFLOW,) * len(self.label_names)
        return key

    def value(self, **labels: str) -> float:
        """Current value of one series (0 if it was never touched)."""
        return self._values.get(tuple(labels[n] for n in self.label_names), 0.0)

    def samples(self) -> list[tuple[LabelValues, float]]:
        return sorted(self._values.items())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]
        for key, value in self.samples():
            if key:
                pairs = ",".join(
                    f'{n}="{_escape(v)}"' for n, v in zip(self.label_names, key, strict=True)
                )
                lines.append(f"{self.name}{{{pairs}}} {_format_number(value)}")
            else:
                lines.append(f"{self.name} {_format_number(value)}")
        return lines


class Counter(_Metric):
    """Only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """Goes up and down, or is computed at scrape time."""

    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, labels: tuple[str, ...], max_label_sets: int
    ) -> None:
        super().__init__(name, help_text, labels, max_label_sets)
        self._function: Callable[[], float] | None = None

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Compute the (unlabelled) value at every scrape."""
        if self.label_names:
            raise ValueError("only unlabelled gauges can be computed")
        self._function = function

    def samples(self) -> list[tuple[LabelValues, float]]:
        if self._function is not None:
            return [((), float(self._function()))]
        return super().samples()


class Registry:
    """Owns a set of metrics and renders them; one per relay instance."""

    def __init__(self, max_label_sets: int = defaults.METRICS_MAX_LABEL_SETS) -> None:
        self.max_label_sets = max_label_sets
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        metric = Counter(name, help_text, labels, self.max_label_sets)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        metric = Gauge(name, help_text, labels, self.max_label_sets)
        self._add(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.render()
        return "\n".join(lines) + "\n"
