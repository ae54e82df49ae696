"""The replies of the scripts, decoded in one place into typed values.

Each script's reply is a flat array (see the header comment of its `.lua` file); its layout is
known here and nowhere else in Python, so a change to a script's reply changes this module and
mypy finds every reader. Argument layouts are built by `core.flows` from `core.plans`, whose
packed tier arguments mirror `admit.lua`'s parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ADMIT_ASSET_STRIDE",
    "AdmitAsset",
    "AdmitBalance",
    "AdmitReply",
    "AssetRead",
    "BalanceReply",
    "decode_admit",
    "decode_asset_read",
    "decode_balance",
]

Reply = Sequence[str | int]

ADMIT_HEAD = 5
"""status, slug, retry-after ms (a grant: requests granted), refused asset, asset count."""
ADMIT_ASSET_STRIDE = 7
"""value, pending, level, tier, overage, throttle remaining, suspended."""
ADMIT_BALANCE_STRIDE = 3
"""available, amount, held (a grant: what it holds)."""


@dataclass(frozen=True, slots=True)
class AdmitAsset:
    """One asset after an admission (or, when refused, as it stands)."""

    value: int
    pending: int
    level: int
    tier: int
    overage: int
    throttle: int
    """Throttle units remaining in the current RateLimit tier; -1 when it has none."""
    suspended: bool


@dataclass(frozen=True, slots=True)
class AdmitBalance:
    """One balance after an admission."""

    available: int
    amount: int
    held: int
    """All credits held; for a grant, the credits this grant holds."""


@dataclass(frozen=True, slots=True)
class AdmitReply:
    """The reply of `admit.lua` for an admission that was decided."""

    status: str
    """'200', '402', '403', '409', '429', or 'none' (a grant that gave nothing)."""
    slug: str
    retry_ms: int
    """-1 without a Retry-After; for a grant, the requests it granted."""
    refused: int
    """1-based index of the asset that refused; 0 for none."""
    assets: tuple[AdmitAsset, ...]
    balances: tuple[AdmitBalance, ...]

    @property
    def empty_balance(self) -> bool:
        """Whether a balance shows nothing in it (amount 0, nothing held): maybe a lost one."""
        return any(b.amount == 0 and b.held == 0 for b in self.balances)


def decode_admit(reply: Reply) -> AdmitReply | tuple[str, str]:
    """Decode `admit.lua`'s reply: an AdmitReply, or a control reply as (kind, detail):
    ('stale', '') the entitlement changed, ('void', '') refunded before it arrived, ('dup', hold
    id) already applied."""
    head = str(reply[0])
    if head in ("stale", "void", "dup"):
        detail = str(reply[1]) if head == "dup" and len(reply) > 1 and reply[1] else ""
        return head, detail
    if len(reply) <= ADMIT_HEAD:  # a refusal with no state: an idempotency conflict
        return AdmitReply(head, str(reply[1]) if len(reply) > 1 else "", -1, 0, (), ())
    n = int(reply[4])
    assets = []
    for i in range(n):
        at = ADMIT_HEAD + ADMIT_ASSET_STRIDE * i
        v, pend, lvl, tier, ovg, thr, susp = reply[at : at + ADMIT_ASSET_STRIDE]
        assets.append(
            AdmitAsset(int(v), int(pend), int(lvl), int(tier), int(ovg), int(thr), int(susp) == 1)
        )
    base = ADMIT_HEAD + ADMIT_ASSET_STRIDE * n
    m = int(reply[base])
    balances = []
    for j in range(m):
        at = base + 1 + ADMIT_BALANCE_STRIDE * j
        balances.append(AdmitBalance(int(reply[at]), int(reply[at + 1]), int(reply[at + 2])))
    return AdmitReply(
        head, str(reply[1]), int(reply[2]), int(reply[3]), tuple(assets), tuple(balances)
    )


@dataclass(frozen=True, slots=True)
class AssetRead:
    """The reply of `asset.lua`'s `read`: the asset as stored."""

    period_start_ms: int
    value: int
    pending: int
    level: int
    overage: int
    suspended: bool


def decode_asset_read(reply: Reply) -> AssetRead:
    """Decode `asset.lua`'s reply to `read`."""
    ps, value, pending, level, overage = (int(x) for x in reply[:5])
    return AssetRead(ps, value, pending, level, overage, str(reply[5]) == "1")


@dataclass(frozen=True, slots=True)
class BalanceReply:
    """The reply of `balance.lua`: status and slug, then the balance as it stands."""

    status: str
    slug: str
    amount: int
    held: int
    available: int
    overage: int
    suspended: bool
    unit: str
    low_at: int | None


def decode_balance(reply: Reply) -> BalanceReply:
    """Decode `balance.lua`'s reply (its fields past the ninth are the operation's own)."""
    return BalanceReply(
        status=str(reply[0]),
        slug=str(reply[1]),
        amount=int(reply[2]),
        held=int(reply[3]),
        available=int(reply[4]),
        overage=int(reply[5]),
        suspended=str(reply[6]) == "1",
        unit=str(reply[7]),
        low_at=int(reply[8]) if reply[8] else None,
    )
