"""Load benchmark of the web page: cold loads (empty browser cache) in headless chromium
against ``ufcal serve`` on the fake engine, with the performance API's numbers.

    python -m tests.web_bench [--loads 10] [--screenshot docs/figures/web-page.png]

Prints one JSON object: first paint and first contentful paint (median, max), DOM ready,
bytes transferred by a cold load (document, script, style, icon and the page's first API
calls) and by a warm one (revalidated with ETags). Targets: first paint under 1 s, a cold
load under 300 KB. ``--screenshot`` also writes the README's image (a palette PNG) after
seeding the store with labelled demo scores and scoring the form's default question."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import page_load, small_png, start_chromium
from tests.servers import ServerProcess, free_port, running


def seed(base_url: str, n: int, rng: random.Random) -> None:
    """``n`` scored and labelled questions: confidence from the fake model's p, right with a
    probability a little under it (an over-confident model, as LLMs tend to be)."""
    for i in range(n):
        p = round(rng.uniform(0.5, 0.99), 2)
        body = {"id": f"demo-{i}", "question": f"Demo question {i} (p={p})", "options": ["a", "b"]}
        reply = httpx.post(base_url + "/score", json=body, timeout=10)
        reply.raise_for_status()
        right = rng.random() < reply.json()["confidence"] * 0.85
        httpx.post(base_url + "/feedback", json={"id": f"demo-{i}", "correct": right}, timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = {
            "UFCAL_LOG_TEXT": "true",
            "UFCAL_LOG_LEVEL": "warning",
            "UFCAL_DB_PATH": str(Path(folder) / "bench.db"),
        }
        argv = [sys.executable, "-m", "tests.fake_app", "--port", str(port)]
        server = ServerProcess("web-bench", argv, env, port, Path(folder))
        with running(server, "/readyz", 30) as started:
            seed(started.base_url, 60, random.Random(7))
            driver = start_chromium()
            try:
                ready = WebDriverWait(driver, 15, poll_frequency=0.02)
                cold = []
                for _ in range(args.loads):
                    driver.execute_cdp_cmd("Network.clearBrowserCache", {})
                    driver.get(started.base_url + "/")
                    ready.until(lambda d: d.find_element(By.ID, "window-size").text == "1000")
                    cold.append(page_load(driver))
                driver.get(started.base_url + "/")
                ready.until(lambda d: d.find_element(By.ID, "window-size").text == "1000")
                warm = page_load(driver)
                fp = [load.first_paint_ms for load in cold]
                fcp = [load.first_contentful_paint_ms for load in cold]
                report = {
                    "loads": len(cold),
                    "first_paint_ms": {"median": statistics.median(fp), "max": max(fp)},
                    "first_contentful_paint_ms": {
                        "median": statistics.median(fcp),
                        "max": max(fcp),
                    },
                    "dom_content_loaded_ms_median": statistics.median(
                        load.dom_content_loaded_ms for load in cold
                    ),
                    "cold_transferred_bytes": max(load.transferred_bytes for load in cold),
                    "cold_requests": cold[0].requests,
                    "warm_transferred_bytes": warm.transferred_bytes,
                    "targets_met": max(fp) < 1000
                    and max(load.transferred_bytes for load in cold) < 300_000,
                }
                if args.screenshot is not None:
                    driver.execute_script(  # the fake model answers A: make A the right one
                        "const inputs = document.querySelectorAll('.option-input');"
                        "[inputs[0].value, inputs[1].value] = [inputs[1].value, inputs[0].value];"
                    )
                    driver.find_element(By.ID, "submit").click()
                    ready.until(lambda d: d.find_element(By.ID, "result").is_displayed())
                    height = driver.execute_script("return document.documentElement.scrollHeight")
                    driver.set_window_size(1280, min(int(height) + 120, 2400))
                    image = small_png(driver.get_screenshot_as_png())
                    args.screenshot.write_bytes(image)
                    report["screenshot_bytes"] = len(image)
            finally:
                driver.quit()
    print(json.dumps(report))
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
