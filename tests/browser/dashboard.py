#!/usr/bin/env python3
"""Drives the controller's dashboard in headless Chromium (Debian's chromium
and chromium-driver, through python3-selenium).

    dashboard.py URL OUT --sites a,b,c [--stop CMD --ap NAME]

Loads the page, checks a tile for every site named and waits until each is
ok, saves OUT/dashboard-healthy.png; then, with --stop, runs CMD (which stops
access point NAME) and measures how long the page takes to paint NAME's tile
red (down or offline), saves OUT/dashboard-ap-down.png. Prints one JSON object
with its figures; exits 1 if a check fails (the reason on stderr).
"""
import argparse
import json
import os
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def fail(why, driver=None, out=None):
    if driver is not None and out:
        driver.save_screenshot(os.path.join(out, "dashboard-failed.png"))
    print(why, file=sys.stderr)
    sys.exit(1)


def until(limit_s, check, step_s=0.05):
    """check() until it returns something true, for at most limit_s."""
    end = time.monotonic() + limit_s
    while True:
        value = check()
        if value or time.monotonic() > end:
            return value
        time.sleep(step_s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--sites", required=True)
    p.add_argument("--stop")
    p.add_argument("--ap")
    p.add_argument("--healthy-within", type=float, default=60.0)
    p.add_argument("--any-state", action="store_true", help="load and measure only (sites need not be ok)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1100"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    figures = {}
    try:
        started = time.monotonic()
        driver.get(a.url)
        loaded = until(20, lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        if not loaded:
            fail("the page never received its summary", driver, a.out)
        figures["loaded_s"] = round(time.monotonic() - started, 3)
        timing = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return {render: window.musubiRender, nav: n && {response_end: n.responseEnd, dom_ready: n.domContentLoadedEventEnd}};"
        )
        if timing and timing.get("render"):
            r = timing["render"]
            figures["summary_received_ms"] = round(r["received_ms"])
            figures["render_ms"] = round(r["rendered_ms"] - r["received_ms"])
        figures["sites_shown"] = int(loaded)
        sites = [s for s in a.sites.split(",") if s]

        def states():
            return {s: (driver.find_elements(By.ID, "site-" + s) or [None])[0] for s in sites}

        missing = [s for s, e in states().items() if e is None]
        if missing:
            fail(f"no tile for {missing}", driver, a.out)
        if a.any_state:
            print(json.dumps(figures))
            return
        healthy = until(a.healthy_within, lambda: all(e.get_attribute("data-state") == "ok" for e in states().values()), 0.25)
        if not healthy:
            bad = {s: e.get_attribute("data-state") for s, e in states().items() if e.get_attribute("data-state") != "ok"}
            fail(f"not every site ok: {bad}", driver, a.out)
        figures["healthy_after_s"] = round(time.monotonic() - started, 3)
        # verify's matrix by segment: a header row and a row per segment.
        matrix = until(10, lambda: driver.find_elements(By.CSS_SELECTOR, "#matrix tr"))
        figures["matrix_rows"] = max(len(matrix) - 1, 0)
        # The detail of the first site opens from the keyboard.
        first = states()[sites[0]]
        first.send_keys("\n")
        shown = until(5, lambda: sites[0] in driver.find_element(By.ID, "detail-title").text)
        if not shown:
            fail("the site's detail did not open", driver, a.out)
        if driver.find_element(By.ID, "live").get_attribute("data-live") != "open":
            fail("the live updates are not connected", driver, a.out)
        driver.save_screenshot(os.path.join(a.out, "dashboard-healthy.png"))
        if a.stop:
            tile = driver.find_element(By.ID, "site-" + a.ap)
            stopped = time.monotonic()
            subprocess.run(a.stop, shell=True, check=True)
            red = until(10, lambda: tile.get_attribute("data-state") in ("down", "offline"))
            if not red:
                fail(f"{a.ap} still {tile.get_attribute('data-state')} 10 s after it stopped", driver, a.out)
            figures["ap_red_after_s"] = round(time.monotonic() - stopped, 3)
            # Its sites see their tunnels to it go down.
            time.sleep(1.0)
            figures["states_after"] = {s: e.get_attribute("data-state") for s, e in states().items()}
            driver.save_screenshot(os.path.join(a.out, "dashboard-ap-down.png"))
    finally:
        driver.quit()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
