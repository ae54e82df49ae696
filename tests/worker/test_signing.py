"""Standard Webhooks signing and verification."""

from __future__ import annotations

import base64
import json

import pytest

from metergate.worker import WebhookVerificationError, sign, sign_headers, verify
from metergate.worker.signing import secret_key

from .conftest import OTHER_SECRET, SECRET

# The published vector (standard-webhooks libraries' "sign function works" test).
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _headers(body: bytes = VECTOR_BODY, secret: str = SECRET) -> dict[str, str]:
    return sign_headers(VECTOR_ID, VECTOR_TS, body, secret)


def test_published_vector_signs_and_verifies() -> None:
    """The Standard Webhooks test vector signs to the published signature and verifies."""
    assert sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY, SECRET) == VECTOR_SIG
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIG,
    }
    assert verify(VECTOR_BODY, headers, SECRET, now=VECTOR_TS) == {"test": 2432232314}


def test_secret_prefix_is_optional_and_padding_tolerated() -> None:
    """A secret with or without `whsec_` gives the same key; unpadded base64 is accepted."""
    assert secret_key(SECRET) == secret_key(SECRET.removeprefix("whsec_"))
    raw = base64.b64encode(b"k" * 25).decode().rstrip("=")
    assert secret_key("whsec_" + raw) == b"k" * 25
    with pytest.raises(ValueError):
        secret_key("whsec_not base64!")
    with pytest.raises(ValueError):
        secret_key("whsec_")


def test_round_trip_with_case_insensitive_headers() -> None:
    """What sign_headers produces verifies, whatever the case of the header names."""
    body = json.dumps({"type": "t", "timestamp": "x", "data": {"a": 1}}).encode()
    headers = {k.upper(): v for k, v in _headers(body).items()}
    assert verify(body, headers, SECRET, now=VECTOR_TS + 10)["data"] == {"a": 1}


@pytest.mark.parametrize(
    "tamper",
    ["body", "id", "timestamp", "signature", "secret"],
)
def test_tampering_is_detected(tamper: str) -> None:
    """Changing the body, id, timestamp, signature or secret makes verification fail."""
    body = VECTOR_BODY
    headers = _headers()
    secret = SECRET
    if tamper == "body":
        body = b'{"test": 2432232315}'
    elif tamper == "id":
        headers["webhook-id"] = "msg_other"
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(VECTOR_TS + 1)
    elif tamper == "signature":
        headers["webhook-signature"] = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    else:
        secret = OTHER_SECRET
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, secret, now=VECTOR_TS)


def test_rotation_accepts_any_listed_secret_and_any_signature() -> None:
    """During a rotation several signatures are sent and several secrets accepted."""
    both = sign_headers(VECTOR_ID, VECTOR_TS, VECTOR_BODY, [OTHER_SECRET, SECRET])
    assert len(both["webhook-signature"].split(" ")) == 2
    assert verify(VECTOR_BODY, both, SECRET, now=VECTOR_TS)
    assert verify(VECTOR_BODY, both, OTHER_SECRET, now=VECTOR_TS)
    old_only = _headers(secret=OTHER_SECRET)
    assert verify(VECTOR_BODY, old_only, [SECRET, OTHER_SECRET], now=VECTOR_TS)


def test_other_versions_and_garbage_are_ignored() -> None:
    """`v2,` items and malformed items are skipped; a valid `v1` among them still verifies."""
    headers = _headers()
    headers["webhook-signature"] = " ".join(
        ["v2," + VECTOR_SIG[3:], "v1,%%%", "garbage", headers["webhook-signature"]]
    )
    assert verify(VECTOR_BODY, headers, SECRET, now=VECTOR_TS)
    headers["webhook-signature"] = "v2," + VECTOR_SIG[3:]
    with pytest.raises(WebhookVerificationError):
        verify(VECTOR_BODY, headers, SECRET, now=VECTOR_TS)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_fails(missing: str) -> None:
    """Each of the three headers is required."""
    headers = _headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(VECTOR_BODY, headers, SECRET, now=VECTOR_TS)


@pytest.mark.parametrize(
    ("offset", "ok"), [(-301, False), (-300, True), (0, True), (300, True), (301, False)]
)
def test_timestamp_tolerance(offset: int, ok: bool) -> None:
    """A timestamp more than five minutes from now, either way, is refused."""
    now = VECTOR_TS - offset
    if ok:
        assert verify(VECTOR_BODY, _headers(), SECRET, now=now)
    else:
        with pytest.raises(WebhookVerificationError, match="timestamp"):
            verify(VECTOR_BODY, _headers(), SECRET, now=now)


def test_malformed_timestamp_and_non_object_body_fail() -> None:
    """A timestamp that is not integer seconds, or a body that is not a JSON object, fails."""
    headers = _headers()
    headers["webhook-timestamp"] = "1614265330.5"
    with pytest.raises(WebhookVerificationError, match="integer"):
        verify(VECTOR_BODY, headers, SECRET, now=VECTOR_TS)
    body = b"[1, 2]"
    with pytest.raises(WebhookVerificationError, match="object"):
        verify(body, _headers(body), SECRET, now=VECTOR_TS)
