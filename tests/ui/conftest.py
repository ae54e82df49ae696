"""Dashboard fixtures: a real headless Chromium driven by selenium, and the admin app on a port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.builders import asset, customer, gateway, metric, plan, tier

from conftest import REQUIRE_REDIS, with_storage
from metergate import Meter
from metergate.admin import admin_app

TOKEN = "dashboard-admin-token-0123456789"
HOSTILE = "<script>alert(1)</script>"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)

CONFIG: dict[str, Any] = gateway(
    metrics={"calls": metric(), "seats": metric("Gauge")},
    plans={
        "pro": plan(
            calls=asset(
                tier(0),
                tier(50, "Warning"),
                tier(80, "OverUsage", per_unit=1),
                tier(120, "OverUsage", "Deny"),
                period="month",
                balance="credits",
            ),
            seats=asset(tier(0), tier(8, "Warning"), tier(10, "OverUsage", "Deny")),
        )
    },
    customers={
        "acme": customer("pro", credits={"amount": 1000, "low_at": 100}),
        "lowco": customer("pro", credits={"amount": 40, "low_at": 100}),
        "emptyco": customer("pro", credits=0),
        HOSTILE: customer("pro", credits=500),
    },
    admin={"token": TOKEN},
    storage={"partitions": 4},
)


def _executables() -> tuple[str, str] | None:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium with a new, empty profile, driven through chromedriver."""
    found = _executables()
    if found is None:
        message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if REQUIRE_REDIS:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def click_and_wait(driver: Any, element: Any) -> None:
    """Click a link or button and wait until the browser has left the page it was on."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def left(_: Any) -> bool:
        # While the old document is being replaced, chromedriver may answer a call on its element
        # with a plain WebDriverException ("node does not belong to the document") rather than a
        # stale-element error: either way the browser has left that page.
        try:
            page.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 15).until(left)
    WebDriverWait(driver, 15).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


@dataclass
class Dashboard:
    """The admin app on a port: its URL, an authorized API client and a Meter on the same storage."""

    url: str
    api: httpx.Client
    meter: Meter

    def sign_in(self, driver: Any, token: str = TOKEN) -> None:
        """Sign in through the form, as an operator does."""
        from selenium.webdriver.common.by import By

        driver.delete_all_cookies()
        driver.get(self.url + "/ui/login")
        driver.find_element(By.ID, "token").send_keys(token)
        click_and_wait(driver, driver.find_element(By.ID, "sign-in"))


@pytest.fixture
def dashboard(storage_url: str) -> Iterator[Dashboard]:
    """The admin API and dashboard over one storage, with the sample customers loaded."""
    config = with_storage(CONFIG, storage_url)
    config["storage"]["partitions"] = 4
    with serve_asgi(admin_app(config)) as url:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"})
        meter = Meter(config)
        try:
            yield Dashboard(url, api, meter)
        finally:
            api.close()
            meter.close()


def screenshot_dir(tmp_path: Path) -> Path:
    """Where screenshots go: `METERGATE_SCREENSHOTS` (docs/dashboard for the README), else tmp."""
    target = os.environ.get("METERGATE_SCREENSHOTS")
    path = Path(target) if target else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path
