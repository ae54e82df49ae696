"""metergate: meter API usage, enforce quotas and draw down prepaid credits in one atomic step."""

from metergate.admin import admin_app
from metergate.asgi import MeteringMiddleware
from metergate.config import ConfigError, GatewayConfig, load_config, parse_config
from metergate.core.errors import Conflict, InvalidAmount, NotFound, StorageUnavailable
from metergate.core.model import AssetUsage, BalanceState, Decision, Throttle, Ticket
from metergate.meter import AsyncMeter, Meter
from metergate.proxy import create_app
from metergate.wsgi import WSGIMeteringMiddleware

__all__ = [
    "AssetUsage",
    "AsyncMeter",
    "BalanceState",
    "ConfigError",
    "Conflict",
    "Decision",
    "GatewayConfig",
    "InvalidAmount",
    "Meter",
    "MeteringMiddleware",
    "NotFound",
    "StorageUnavailable",
    "Throttle",
    "Ticket",
    "WSGIMeteringMiddleware",
    "admin_app",
    "create_app",
    "load_config",
    "parse_config",
]
