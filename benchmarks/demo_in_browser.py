"""The web demo in a real headless browser: upload the example pose, press Generate, wait for
the gallery, take a screenshot. A manual check (CI tests the demo through its API).

    sudo apt-get install chromium chromium-driver && .venv/bin/pip install selenium
    .venv/bin/python -m benchmarks.demo_in_browser --methods plain_sd two_stage \
        --screenshot docs/demo.png

Exits non-zero when the gallery does not show the skeleton and one image per method.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from experiments.demo import build_demo
from experiments.sample import Sampler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("SE_AVOID_STATS", "true")  # no usage statistics from Selenium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/eval/tiny.yaml")
    parser.add_argument("--methods", nargs="+", default=["plain_sd", "two_stage"])
    parser.add_argument("--pose", default="docs/examples/pose.json")
    parser.add_argument("--screenshot", default="docs/demo.png")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args(argv)
    demo = build_demo(Sampler(args.config, "results/demo"), args.methods)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    # the local driver: Selenium Manager would otherwise look for one on the network
    browser = webdriver.Chrome(options=options, service=Service(args.chromedriver))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 60
        while not browser.find_elements(By.CSS_SELECTOR, "input[type=file]"):
            if time.monotonic() > deadline:
                raise TimeoutError("the page showed no file input")
            time.sleep(0.5)
        upload = browser.find_elements(By.CSS_SELECTOR, "input[type=file]")[0]
        upload.send_keys(str(Path(args.pose).resolve()))
        time.sleep(2)
        (button,) = [b for b in browser.find_elements(By.TAG_NAME, "button")
                     if b.text.strip() == "Generate"]  # fmt: skip
        button.click()
        start = time.monotonic()
        expected = 1 + len(args.methods)
        gallery = ".grid-wrap img, .gallery img"
        while len(browser.find_elements(By.CSS_SELECTOR, gallery)) < expected:
            if time.monotonic() - start > args.timeout:
                break
            time.sleep(1)
        images = browser.find_elements(By.CSS_SELECTOR, gallery)
        seconds = time.monotonic() - start
        browser.save_screenshot(args.screenshot)
    finally:
        browser.quit()
        demo.close()
    print(f"{len(images)} of {expected} gallery images after {seconds:.1f} s; "
          f"screenshot: {args.screenshot}")  # fmt: skip
    return 0 if len(images) >= expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
