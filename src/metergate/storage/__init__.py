"""Storage drivers: run the core's script calls and commands on Redis or the embedded backend."""

from metergate.storage.drivers import AsyncStorage, SyncStorage, open_async, open_sync

__all__ = ["AsyncStorage", "SyncStorage", "open_async", "open_sync"]
