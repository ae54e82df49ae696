"""Plans compiled once at start: tier arguments pre-encoded for the scripts, limits precomputed."""

from __future__ import annotations

from dataclasses import dataclass

from metergate.config import LEVELS, AssetConfig, GatewayConfig, TierConfig

__all__ = ["KIND_CODES", "POLICY_CODES", "CompiledAsset", "compile_plans"]

POLICY_CODES = {
    "NotifyOnly": "N",
    "AllowWithOverage": "O",
    "AllowWithGrace": "G",
    "RateLimit": "R",
    "Deny": "D",
    "SuspendUsage": "S",
}
KIND_CODES = {
    "CumulativeCounter": "C",
    "TotalCounter": "T",
    "Gauge": "G",
    "UpDownCounter": "U",
}


def _refusal_threshold(tier: TierConfig) -> int | None:
    if tier.policy in ("Deny", "SuspendUsage"):
        return tier.from_
    if tier.policy == "AllowWithGrace" and tier.grace is not None:
        return tier.from_ + tier.grace
    return None


@dataclass(frozen=True, slots=True)
class CompiledAsset:
    """One plan's configuration of one metric, ready to be sent to the admission script."""

    metric: str
    kind: str
    period: str | None
    balance: str | None
    tiers: tuple[TierConfig, ...]
    tier_args: tuple[str, ...]
    tier_flags: str
    """Per tier: 'b' base price, 'r' RateLimit, 'x' both, '-' neither (the state it keeps)."""
    limits: tuple[int | None, ...]
    """Per tier: the value at which admissions start to be refused, seen from that tier."""
    local: bool = False
    """Whether admissions may come from a local allowance: a counter, not `strict`, without a
    RateLimit tier (a throttle counts each attempt in storage)."""

    def tier_index(self, value: int) -> int:
        """Return the index of the tier a value lies in (units beyond a tier's `from` are in it)."""
        index = 0
        for i, tier in enumerate(self.tiers):
            if tier.from_ < value:
                index = i
            else:
                break
        return index

    def quota_tier(self, value: int) -> TierConfig | None:
        """Return the tier that refuses a quota-exceeded admission from `value`: the first Deny or
        AllowWithGrace (with a grace) tier at or above the value's own."""
        for tier in self.tiers[self.tier_index(value) :]:
            if tier.policy == "Deny" or (
                tier.policy == "AllowWithGrace" and tier.grace is not None
            ):
                return tier
        return None

    def level_name(self, index: int) -> str:
        """Return the level name of tier `index`."""
        return self.tiers[index].level


def _compile(metric: str, kind: str, asset: AssetConfig) -> CompiledAsset:
    # Every tier's `from`, then one argument per tier of its other fields: the script parses
    # a tier only when a value reaches it.
    args: list[str] = [str(tier.from_) for tier in asset.tiers]
    for tier in asset.tiers:
        rate, price = tier.rate, tier.price
        args.append(
            " ".join(
                (
                    str(LEVELS.index(tier.level)),
                    POLICY_CODES[tier.policy],
                    str(tier.grace or 0),
                    str(rate.limit if rate else 1),
                    str(rate.per if rate else 1000),
                    str(price.per_unit if price else 0),
                    str(price.per if price else 1),
                    str(price.base if price else 0),
                )
            )
        )
    flags = "".join(
        "xrb-"[(t.price is None or not t.price.base) * 1 + (t.policy != "RateLimit") * 2]
        for t in asset.tiers
    )
    thresholds = [_refusal_threshold(t) for t in asset.tiers]
    limits: list[int | None] = []
    for k in range(len(asset.tiers)):
        ahead = [t for t in thresholds[k:] if t is not None]
        limits.append(min(ahead) if ahead else None)
    return CompiledAsset(
        metric=metric,
        kind=KIND_CODES[kind],
        period=asset.period,
        balance=asset.balance,
        tiers=tuple(asset.tiers),
        tier_args=tuple(args),
        tier_flags=flags,
        limits=tuple(limits),
        local=kind in ("CumulativeCounter", "TotalCounter")
        and not asset.strict
        and all(t.policy != "RateLimit" for t in asset.tiers),
    )


def compile_plans(config: GatewayConfig) -> dict[str, dict[str, CompiledAsset]]:
    """Compile every plan's assets: {plan: {metric: CompiledAsset}}."""
    return {
        pname: {
            metric: _compile(metric, config.metrics[metric].type, asset)
            for metric, asset in plan.assets.items()
        }
        for pname, plan in config.plans.items()
    }
