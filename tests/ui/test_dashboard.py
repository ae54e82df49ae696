"""The operator dashboard in a real headless Chromium: what it shows is what the admin API says."""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By

from metergate.core.flows import Command

from .conftest import HOSTILE, TOKEN, Dashboard, click_and_wait


def texts(driver: Any, selector: str) -> list[str]:
    """The visible texts of every element matching a CSS selector."""
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def attr(driver: Any, selector: str, name: str) -> str:
    """One attribute of the first element matching a CSS selector."""
    return str(driver.find_element(By.CSS_SELECTOR, selector).get_attribute(name))


def customer_url(dashboard: Dashboard, customer: str) -> str:
    return f"{dashboard.url}/ui/customers/{urllib.parse.quote(customer, safe='')}"


def test_sign_in_sets_a_strict_http_only_session_and_lists_customers(
    browser: Any, dashboard: Dashboard
) -> None:
    """Signing in with the admin token gives an HttpOnly SameSite=Strict cookie and the list."""
    dashboard.sign_in(browser)
    assert browser.current_url == dashboard.url + "/ui/"
    cookie = browser.get_cookie("mg_session")
    assert cookie is not None and cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    listed = [
        r.get_attribute("data-customer")
        for r in browser.find_elements(By.CSS_SELECTOR, "#customers tbody tr")
    ]
    assert sorted(listed) == sorted(["acme", "lowco", "emptyco", HOSTILE])


def test_depleted_and_low_balances_come_first_with_the_admin_apis_numbers(
    browser: Any, dashboard: Dashboard
) -> None:
    """The list puts depleted, then low balances first; each available amount is the API's."""
    dashboard.meter.suspend_asset("acme", "seats")
    dashboard.sign_in(browser)
    rows = browser.find_elements(By.CSS_SELECTOR, "#customers tbody tr")
    order = [r.get_attribute("data-customer") for r in rows]
    assert order.index("emptyco") < order.index("lowco") < order.index(HOSTILE)
    assert order.index("acme") < order.index("lowco")  # a suspended asset needs a look too
    for row in rows:
        customer = str(row.get_attribute("data-customer"))
        shown = row.find_element(By.CSS_SELECTOR, "[data-balance=credits]")
        if "/" in customer:  # the admin API's routes cannot take it (`/` splits the path)
            available = dashboard.meter.balance(customer, "credits").available
        else:
            available = dashboard.api.get(f"/v1/customers/{customer}/balances/credits").json()[
                "available"
            ]
        assert int(str(shown.get_attribute("data-available"))) == available
    assert "depleted" in browser.find_element(By.CSS_SELECTOR, "[data-customer=emptyco]").text
    assert "low" in browser.find_element(By.CSS_SELECTOR, "[data-customer=lowco]").text


def test_a_hostile_customer_name_is_shown_as_text_and_never_runs(
    browser: Any, dashboard: Dashboard
) -> None:
    """A customer named `<script>alert(1)</script>` appears as text on every page; no script runs."""
    dashboard.meter.record(HOSTILE, "calls", 60)  # a level change: an event naming it
    dashboard.sign_in(browser)
    click_and_wait(browser, browser.find_element(By.LINK_TEXT, HOSTILE))
    assert browser.find_element(By.ID, "customer-name").text == HOSTILE
    browser.get(dashboard.url + "/ui/events")
    assert HOSTILE in texts(browser, "table.events td a")
    for page in ("/ui/", "/ui/events", "/ui/customers/" + urllib.parse.quote(HOSTILE, safe="")):
        browser.get(dashboard.url + page)
        assert "<script>alert" not in browser.page_source.replace("&lt;script&gt;", "")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018


def test_the_customer_page_shows_the_admin_apis_usage_balances_holds_and_ledger(
    browser: Any, dashboard: Dashboard
) -> None:
    """Per metric the value, limit, remaining and level; balances with their holds; the ledger."""
    meter = dashboard.meter
    assert meter.record("acme", "calls", 90).allowed
    meter.record("acme", "seats", 9)
    rid = meter.reserve("acme", "credits", 25, 600)
    meter.topup("acme", "credits", 7)
    dashboard.sign_in(browser)
    browser.get(customer_url(dashboard, "acme"))
    usage = dashboard.api.get("/v1/customers/acme/usage").json()["metrics"]
    for metric, fields in usage.items():
        card = f"section.metric[data-metric={metric}]"
        assert int(attr(browser, f"{card} [data-value]", "data-value")) == fields["value"]
        assert attr(browser, f"{card} [data-level]", "data-level") == fields["level"]
        if fields["limit"] is not None:
            assert int(attr(browser, f"{card} [data-limit]", "data-limit")) == fields["limit"]
            assert (
                int(attr(browser, f"{card} [data-remaining]", "data-remaining"))
                == fields["remaining"]
            )
    assert usage["calls"]["level"] == "OverUsage"
    # the tier bar draws one coloured segment per tier; the chart's current total is the value
    segments = browser.find_elements(
        By.CSS_SELECTOR, "section.metric[data-metric=calls] svg.bar rect[class^=lvl-]"
    )
    assert [s.get_attribute("class") for s in segments] == [
        "lvl-normal",
        "lvl-warning",
        "lvl-overusage",
        "lvl-overusage",
    ]
    current = attr(browser, "[data-metric=calls] [data-chart-current]", "data-chart-current")
    assert int(current) == usage["calls"]["value"]
    assert browser.find_elements(By.CSS_SELECTOR, "[data-metric=seats] svg.chart") == []
    balance = dashboard.api.get("/v1/customers/acme/balances/credits").json()
    card = "section.balance[data-balance=credits]"
    for field in ("available", "amount", "held"):
        shown = attr(browser, f"{card} [data-{field}]", f"data-{field}")
        assert int(shown) == balance[field]
    assert balance["held"] == 25
    assert [
        h.get_attribute("data-hold")
        for h in browser.find_elements(By.CSS_SELECTOR, f"{card} tr[data-hold]")
    ] == [rid]
    ledger = dashboard.api.get("/v1/customers/acme/ledger").json()["entries"]
    kinds = [
        r.get_attribute("data-kind")
        for r in browser.find_elements(By.CSS_SELECTOR, "table.ledger tbody tr")
    ]
    assert kinds == [e["kind"] for e in ledger]
    assert "quota.level_changed" in texts(browser, "table.events td code")


def test_the_ledger_is_paginated(browser: Any, dashboard: Dashboard) -> None:
    """A long ledger is shown 50 lines a page; the pages together are the API's ledger."""
    for _ in range(60):
        dashboard.meter.topup("acme", "credits", 1)
    dashboard.sign_in(browser)
    browser.get(customer_url(dashboard, "acme"))
    first = browser.find_elements(By.CSS_SELECTOR, "table.ledger tbody tr[data-kind]")
    assert len(first) == 50
    click_and_wait(browser, browser.find_element(By.ID, "older"))
    second = browser.find_elements(By.CSS_SELECTOR, "table.ledger tbody tr[data-kind]")
    ledger = dashboard.api.get("/v1/customers/acme/ledger?limit=1000").json()["entries"]
    assert len(second) == len(ledger) - 50 == 11  # 60 top-ups and the initial amount
    assert second[-1].get_attribute("data-kind") == "initial"


def _dead_letter(dashboard: Dashboard) -> dict[str, Any]:
    """Make an event a dead letter, as the delivery script does when it gives up."""
    dashboard.meter.topup("lowco", "credits", 5)
    event = next(
        e
        for e in dashboard.api.get("/v1/events").json()["events"]
        if e["type"] == "balance.topped_up" and e["customer"] == "lowco"
    )
    core = dashboard.meter.core
    dashboard.meter.storage.run(
        Command(
            (
                "XADD",
                core.keys.dead_letters(event["partition"]),
                "*",
                "id",
                event["id"],
                "type",
                event["type"],
                "customer",
                event["customer"],
                "time",
                str(event["time"]),
                "data",
                '{"customer":"lowco","balance":"credits","amount":5,"balance_after":45}',
                "destination",
                "billing",
                "reason",
                "HTTP 500",
                "dead_at",
                str(event["time"]),
            )
        )
    )
    return event


def queued_copies(dashboard: Dashboard, event_id: str) -> int:
    return sum(
        1
        for e in dashboard.api.get("/v1/events?limit=1000").json()["events"]
        if e["id"] == event_id and e["status"] == "queued"
    )


def test_redeliver_on_a_dead_letter_queues_it_again(browser: Any, dashboard: Dashboard) -> None:
    """Clicking Redeliver on a dead letter puts it back in the outbox, as the admin API does."""
    event = _dead_letter(dashboard)
    before = queued_copies(dashboard, event["id"])
    dashboard.sign_in(browser)
    browser.get(dashboard.url + "/ui/events?status=dead")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.events tbody tr.status-dead")
    assert [r.get_attribute("data-event") for r in rows] == [event["id"]]
    click_and_wait(browser, rows[0].find_element(By.CSS_SELECTOR, "button.redeliver"))
    assert event["id"] in browser.find_element(By.ID, "redelivered").text
    assert queued_copies(dashboard, event["id"]) == before + 1


def test_a_wrong_token_is_refused_and_gives_no_session(browser: Any, dashboard: Dashboard) -> None:
    """Signing in with a wrong token answers the sign-in page again, without a session cookie."""
    dashboard.sign_in(browser, token=TOKEN + "x")
    assert "not the admin token" in browser.find_element(By.ID, "error").text
    assert browser.get_cookie("mg_session") is None
    browser.get(dashboard.url + "/ui/events")
    assert browser.current_url == dashboard.url + "/ui/login"


def test_a_form_without_its_csrf_token_is_refused(browser: Any, dashboard: Dashboard) -> None:
    """Redeliver posted without the CSRF token is refused with 403 and queues nothing."""
    event = _dead_letter(dashboard)
    before = queued_copies(dashboard, event["id"])
    dashboard.sign_in(browser)
    browser.get(dashboard.url + "/ui/events?status=dead")
    browser.execute_script(
        "document.querySelectorAll('form input[name=csrf]').forEach(e => e.remove())"
    )
    click_and_wait(browser, browser.find_element(By.CSS_SELECTOR, "button.redeliver"))
    assert "CSRF" in browser.find_element(By.ID, "refused").text
    assert queued_copies(dashboard, event["id"]) == before


@contextlib.contextmanager
def _session(dashboard: Dashboard) -> Iterator[tuple[httpx.Client, str]]:
    """Sign in over plain HTTP; yield the client (holding the cookie) and a page's CSRF token."""
    with httpx.Client(base_url=dashboard.url) as client:
        yield client, _signed_in(client)


def _signed_in(client: httpx.Client) -> str:
    form = client.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    signed = client.post("/ui/login", data={"csrf": csrf.group(1), "token": TOKEN})
    assert signed.status_code == 303
    page = client.get("/ui/events")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    return token.group(1)


def test_posts_with_a_wrong_csrf_token_or_from_another_site_are_refused(
    dashboard: Dashboard,
) -> None:
    """A wrong or missing CSRF token, or another site's Origin, is 403 and redelivers nothing."""
    event = _dead_letter(dashboard)
    before = queued_copies(dashboard, event["id"])
    with _session(dashboard) as (client, csrf):
        forged = csrf[:-1] + ("1" if csrf.endswith("0") else "0")  # one character off, never equal
        for data, headers in (
            ({"event": event["id"]}, {}),
            ({"event": event["id"], "csrf": forged}, {}),
            ({"event": event["id"], "csrf": csrf}, {"origin": "https://evil.example"}),
        ):
            refused = client.post("/ui/events/redeliver", data=data, headers=headers)
            assert refused.status_code == 403
        assert queued_copies(dashboard, event["id"]) == before
        accepted = client.post("/ui/events/redeliver", data={"event": event["id"], "csrf": csrf})
        assert accepted.status_code == 303
        assert queued_copies(dashboard, event["id"]) == before + 1


def test_sign_in_without_its_csrf_token_or_with_a_forged_cookie_is_refused(
    dashboard: Dashboard,
) -> None:
    """The sign-in form needs its CSRF token; a session cookie not signed by the server is ignored."""
    with httpx.Client(base_url=dashboard.url) as client:
        client.get("/ui/login")
        assert client.post("/ui/login", data={"token": TOKEN}).status_code == 403
        assert "mg_session" not in client.cookies
        client.cookies.set("mg_session", "1.forged.0000", path="/ui/")
        assert client.get("/ui/").status_code == 303


def test_pages_forbid_scripts_and_framing(dashboard: Dashboard) -> None:
    """Every page carries a Content-Security-Policy allowing no script, and no framing."""
    with _session(dashboard) as (client, _csrf):
        for page in ("/ui/", "/ui/events", "/ui/customers/acme", "/ui/login"):
            policy = client.get(page).headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src" not in policy
            assert "frame-ancestors 'none'" in policy
        assert client.get("/ui/customers/nobody").status_code == 404
