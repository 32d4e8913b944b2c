"""Browser tests: Debian's Chromium driven by Playwright against live Kite instances.

Playwright is started per module with `sync_playwright()` (not pytest-playwright's session
fixtures): its event loop must be gone before the database tests that run after these, or
Django refuses their queries as made from async code. Never `playwright install`: the
browser is /usr/bin/chromium (`make test` installs Debian's package if it is missing).
"""

import re
import signal
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"

if not CHROMIUM.exists():  # `make test` installs it; a missing browser must fail the run, not skip it
    raise pytest.UsageError("Debian's chromium is not installed: apt-get install chromium (make test does)")
from playwright import sync_api  # noqa: E402


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def bootstrap_password(kite) -> str:
    """The browser login `make run` prints once (kite.services.bootstrap), read back from the log."""
    found = re.search(r"password: (\S+)", kite.log_path.read_text())
    assert found, f"no bootstrap password in {kite.log_path}"
    return found.group(1)


class Operator:
    """One instance's operator: a browser context of its own (both instances are 127.0.0.1, and
    cookies do not care for ports), logged in as the bootstrap superuser."""

    def __init__(self, browser, kite, label: str):
        self.kite, self.label = kite, label
        self.context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(15_000)
        self.page = self.context.new_page()

    def login(self) -> "Operator":
        self.go("/login/")
        self.page.fill("#id_username", "admin")
        self.page.fill("#id_password", bootstrap_password(self.kite))
        self.page.click("main button[type=submit]")
        try:
            self.page.wait_for_url(re.compile(r"^https://[^/]+/$"))  # the Overview
        except Exception:
            self.shot(f"login-failed-{self.label}")
            raise
        return self

    def go(self, path: str):
        self.page.goto(self.kite.url + path)
        return self.page

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def value(self, selector: str) -> str:
        return self.page.input_value(selector)

    def submit(self, form_selector: str = "main form[method=post]") -> None:
        self.page.locator(form_selector).locator("button[type=submit]").first.click()

    def close(self) -> None:
        self.context.close()


def stop_quietly(kite) -> None:
    if kite.process is not None:
        kite.stop(signal.SIGTERM)
