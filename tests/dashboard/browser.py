"""A headless Chromium for the dashboard's browser tests: Debian's ``chromium`` and
``chromium-driver`` driven by Selenium, or a reason to skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests import servers

#: Set to a directory of the checkout (``docs``) to write the pages' screenshots there too.
SCREENSHOTS_ENV = "EBSQS_DASHBOARD_SCREENSHOTS"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_problem() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    if chromium() is None or shutil.which("chromedriver") is None:
        return (
            "no headless browser: install Debian's chromium and chromium-driver "
            "(`make test` does it as root where apt-get exists)"
        )
    return None


@contextmanager
def headless() -> Iterator[Any]:
    """A Selenium driver of headless Chromium, 1400x900 (call :func:`browser_problem` first)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium())
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: Any) -> str:
    """The current page's text; empty while a click's navigation replaces the page."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("tag name", "body").text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def page_shows(driver: Any, url: str, *texts: str) -> bool:
    """Load ``url``; whether its text holds every one of ``texts``."""
    driver.get(url)
    body = page_text(driver)
    return all(text in body for text in texts)


def screenshot(driver: Any, directory: Any, name: str) -> None:
    """``dashboard-<name>.png`` into ``directory``, and into ``$EBSQS_DASHBOARD_SCREENSHOTS``."""
    driver.save_screenshot(str(directory / f"dashboard-{name}.png"))
    target = os.environ.get(SCREENSHOTS_ENV)
    if target:
        (servers.ROOT / target).mkdir(exist_ok=True)
        driver.save_screenshot(str(servers.ROOT / target / f"dashboard-{name}.png"))
