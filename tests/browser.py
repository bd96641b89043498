"""Debian's headless chromium driven through chromium-driver (Selenium), for the web page's
tests and its load benchmark (tests/web_bench.py)."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

# Nothing of its own in the background (updates, sync, metrics): the network log then
# holds the page's requests only.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # we run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--window-size=1280,1500",
)


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver), or None when either is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium() -> webdriver.Chrome:
    """A headless chromium session that records the network (performance log) and the
    console (browser log)."""
    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))


def network_requests(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The requests the browser sent since the last call (DevTools Network events)."""
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            requests.append(message["params"]["request"])
    return requests


@dataclass(frozen=True)
class PageLoad:
    """What the performance API says about the last page load."""

    first_paint_ms: float
    first_contentful_paint_ms: float
    dom_content_loaded_ms: float
    transferred_bytes: int  # the document and every resource and fetch() so far
    requests: int


_PAGE_LOAD_JS = """
const nav = performance.getEntriesByType('navigation')[0];
const paints = {};
for (const p of performance.getEntriesByType('paint')) paints[p.name] = p.startTime;
const resources = performance.getEntriesByType('resource');
return {
  fp: paints['first-paint'] ?? null,
  fcp: paints['first-contentful-paint'] ?? null,
  dcl: nav.domContentLoadedEventEnd,
  transferred: nav.transferSize + resources.reduce((s, r) => s + r.transferSize, 0),
  requests: 1 + resources.length,
};
"""


def page_load(driver: webdriver.Chrome) -> PageLoad:
    """First paint, first contentful paint and bytes transferred, from the page itself."""
    raw = driver.execute_script(_PAGE_LOAD_JS)
    if raw["fp"] is None or raw["fcp"] is None:
        raise RuntimeError(f"the page reported no paint: {raw}")
    return PageLoad(
        float(raw["fp"]),
        float(raw["fcp"]),
        float(raw["dcl"]),
        int(raw["transferred"]),
        int(raw["requests"]),
    )


def small_png(png: bytes, colors: int = 128) -> bytes:
    """A screenshot as a palette PNG (a few times smaller; the page has few colours)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(
        out, format="PNG", optimize=True
    )
    return out.getvalue()
