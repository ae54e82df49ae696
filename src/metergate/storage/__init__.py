"""Storage drivers: run the core's script calls and commands on Redis or the embedded backend."""

from metergate.storage.drivers import (
    AsyncStorage,
    SyncStorage,
    UnsafeStorage,
    open_async,
    open_sync,
)

__all__ = ["AsyncStorage", "SyncStorage", "UnsafeStorage", "open_async", "open_sync"]
