"""Prometheus metrics of the gateway: admissions by outcome, decision latency, storage errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from metergate.core.model import Decision

__all__ = [
    "ADMISSIONS",
    "ADMISSIONS_UNKNOWN",
    "DECISION_SECONDS",
    "REGISTRY",
    "STORAGE_ERRORS",
    "WEBHOOK_BACKLOG",
    "observe",
]

REGISTRY = CollectorRegistry(auto_describe=True)

ADMISSIONS = Counter(
    "metergate_admissions",
    "Metered requests by outcome (allowed, or the problem slug of the refusal).",
    ["outcome"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "metergate_decision_seconds",
    "Time to decide one admission, storage round trip included.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
STORAGE_ERRORS = Counter(
    "metergate_storage_errors",
    "Storage calls that failed or timed out.",
    registry=REGISTRY,
)
ADMISSIONS_UNKNOWN = Counter(
    "metergate_admissions_unknown",
    "Admissions whose outcome stays unknown: storage gave no reply, and they could be neither "
    "refunded nor confirmed (they may stay charged).",
    registry=REGISTRY,
)
WEBHOOK_BACKLOG = Gauge(
    "metergate_webhook_backlog",
    "Outbox events not yet delivered to every endpoint.",
    registry=REGISTRY,
)


_ALLOWED = ADMISSIONS.labels("allowed")


def observe_local() -> None:
    """Count one admission given from a local allowance (decided in process, no storage time)."""
    _ALLOWED.inc()


def observe(decision: Decision, seconds: float) -> None:
    """Count one decided admission by outcome and record how long deciding it took."""
    if decision.allowed:
        _ALLOWED.inc()
    else:
        ADMISSIONS.labels(decision.problem or "refused").inc()
    DECISION_SECONDS.observe(seconds)
