"""Screenshots of every dashboard page over a customer's two months, for the README.

`METERGATE_SCREENSHOTS=docs/dashboard pytest tests/ui/test_screenshots.py` writes them where the
README shows them; otherwise they go to a temporary directory.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from tests.adapters.harness import serve_asgi
from tests.storage.test_usage_history import report

from conftest import Clock, with_storage
from metergate import Meter
from metergate.admin import admin_app

from .conftest import CONFIG, HOSTILE, Dashboard, screenshot_dir
from .test_dashboard import _dead_letter

DAY_S = 86_400


@pytest.fixture
def story(tmp_path: Path) -> Iterator[Dashboard]:
    """acme's last 50 days of traffic (its period starts 20 days ago), and three other customers."""
    url = f"memory://screenshots-{time.time_ns()}"
    start = time.time() - 50 * DAY_S
    config = with_storage(CONFIG, url)
    config["storage"]["partitions"] = 4
    config["usage_report_interval"] = "1h"
    anchor = datetime.fromtimestamp(time.time() - 20 * DAY_S, UTC).replace(microsecond=0)
    config["customers"] = {
        **CONFIG["customers"],
        "acme": {
            "entitlement": {"plan": "pro", "anchor": anchor.isoformat()},
            "balances": {"credits": {"amount": 150, "low_at": 100}},
        },
    }
    clock = Clock(start)
    past = Meter(config, clock=clock)
    for day in range(50):
        past.record("acme", "calls", 2 + day % 5 // 2 + (day > 35))
        if day == 10:
            past.topup("acme", "credits", 500)
        clock.advance(DAY_S)
    report(url, int(time.time() * 1000))
    past.record("acme", "seats", 9)
    past.reserve("acme", "credits", 40, 3600)
    past.record(HOSTILE, "calls", 55)
    past.close()
    with serve_asgi(admin_app(config)) as base:
        api = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {CONFIG['admin']['token']}"}
        )
        meter = Meter(config)
        try:
            yield Dashboard(base, api, meter)
        finally:
            api.close()
            meter.close()


def shoot(driver: Any, path: Path, width: int = 1280) -> None:
    """Save the whole page at a width (the window grows to the page's height)."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(int(height) + 140, 2200))
    driver.save_screenshot(str(path))


def test_screenshots_of_every_page(browser: Any, story: Dashboard, tmp_path: Path) -> None:
    """Each page renders the story (sign-in, customers, one customer, events) and is saved as PNG."""
    out = screenshot_dir(tmp_path)
    _dead_letter(story)
    browser.delete_all_cookies()
    browser.get(story.url + "/ui/login")
    shoot(browser, out / "sign-in.png", 900)
    story.sign_in(browser)
    shoot(browser, out / "customers.png")
    browser.get(f"{story.url}/ui/customers/{urllib.parse.quote('acme', safe='')}")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-metric=calls] svg.chart polyline.previous")
    shown = browser.find_element(By.CSS_SELECTOR, "[data-metric=calls] [data-chart-previous]")
    assert int(str(shown.get_attribute("data-chart-previous"))) > 0
    shoot(browser, out / "customer.png")
    shoot(browser, out / "customer-phone.png", 400)
    browser.get(story.url + "/ui/events")
    shoot(browser, out / "events.png")
    browser.set_window_size(1280, 1000)
    for name in ("sign-in", "customers", "customer", "customer-phone", "events"):
        assert (out / f"{name}.png").stat().st_size > 0
