"""Standard Webhooks signatures: sign what the worker sends, verify what a receiver gets.

The signed content is `{webhook-id}.{webhook-timestamp}.{raw body}`, the signature is
`v1,<base64 HMAC-SHA256>` keyed with the base64-decoded part of a `whsec_` secret, and the
`webhook-signature` header holds one or more of them separated by spaces (several while a secret
is being rotated).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "WebhookVerificationError",
    "secret_key",
    "sign",
    "sign_headers",
    "verify",
]

DEFAULT_TOLERANCE_S = 300
_SECRET_PREFIX = "whsec_"
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")


class WebhookVerificationError(Exception):
    """A webhook failed verification: a missing or malformed header, a stale timestamp, no match."""


def secret_key(secret: str) -> bytes:
    """Return the HMAC key of a secret: the base64 after `whsec_` (the prefix may be left out)."""
    encoded = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a webhook secret must not be empty")
    return key


def _digest(key: bytes, msg_id: str, timestamp: int, payload: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(msg_id: str, timestamp: int, payload: bytes, secret: str) -> str:
    """Return the `v1,<base64>` signature of one message under one secret."""
    digest = _digest(secret_key(secret), msg_id, timestamp, payload)
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(
    msg_id: str, timestamp: int, payload: bytes, secrets: str | Iterable[str]
) -> dict[str, str]:
    """Return the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers of a message."""
    if isinstance(secrets, str):
        secrets = [secrets]
    signatures = " ".join(sign(msg_id, timestamp, payload, s) for s in secrets)
    if not signatures:
        raise ValueError("sign with at least one secret")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


def _candidates(header: str) -> list[bytes]:
    """Decode the `v1` signatures of a header; other versions and malformed items are skipped."""
    out: list[bytes] = []
    for item in header.split(" "):
        version, _, encoded = item.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            out.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


def verify(
    payload: bytes,
    headers: Mapping[str, str],
    secret: str | list[str],
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook's signature and timestamp; return its parsed JSON body.

    `secret` may be a list: during a rotation the receiver accepts a signature under any of them.
    Raises WebhookVerificationError when a header is missing or malformed, when the timestamp is
    more than `tolerance_s` away from `now`, or when no `v1` signature matches (compared in
    constant time).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    header = lowered.get("webhook-signature")
    if not msg_id or not stamp or not header:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not _TIMESTAMP.match(stamp.strip()):
        raise WebhookVerificationError("webhook-timestamp is not an integer of seconds")
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    try:
        keys = [secret_key(s) for s in ([secret] if isinstance(secret, str) else secret)]
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    received = _candidates(header)
    # Every candidate is compared against every key, so the time taken does not reveal which one
    # (if any) matched first.
    matched = False
    for key in keys:
        expected = _digest(key, msg_id, timestamp, payload)
        for candidate in received:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise WebhookVerificationError("no signature matches")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise WebhookVerificationError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return body
