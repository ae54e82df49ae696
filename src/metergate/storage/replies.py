"""Error replies as redis-py raises them: the same exception class and message for the same reply.

The lean clients (blocking.py, pipelined.py) and the embedded backend read error replies
themselves; this maps one to the exception redis-py would raise for it, so that the drivers treat
errors from every client alike. The table follows redis-py's: a known error code selects the
class and is cut off the message (kept in `status_code`); an unknown one stays in the message.
"""

from __future__ import annotations

from redis import exceptions

__all__ = ["reply_error"]

_CLASSES: dict[str, type[exceptions.RedisError]] = {
    "ERR": exceptions.ResponseError,
    "OOM": exceptions.OutOfMemoryError,
    "WRONGPASS": exceptions.AuthenticationError,
    "NOAUTH": exceptions.AuthenticationError,
    "EXECABORT": exceptions.ExecAbortError,
    "LOADING": exceptions.BusyLoadingError,
    "NOSCRIPT": exceptions.NoScriptError,
    "READONLY": exceptions.ReadOnlyError,
    "NOPERM": exceptions.NoPermissionError,
    "TRYAGAIN": exceptions.TryAgainError,
    "CLUSTERDOWN": exceptions.ClusterDownError,
    "CROSSSLOT": exceptions.ClusterCrossSlotError,
    "MASTERDOWN": exceptions.MasterDownError,
}


def reply_error(text: str) -> exceptions.RedisError:
    """The exception redis-py raises for the error reply `text` (`CODE message`)."""
    code = text.split(" ")[0]
    cls = _CLASSES.get(code)
    if cls is None:
        return exceptions.ResponseError(text)
    error = cls(text[len(code) + 1 :])
    error.status_code = code
    return error
