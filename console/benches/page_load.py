#!/usr/bin/env python3
"""Loads the console's timeline of one instance in headless Chromium and
prints how long it took, as measured by the page (window.vmr.lastRender:
from the timeline request to the drawn canvas) and by navigation timing.

Used by benches/timeline.rs; reads CONSOLE_URL, TOKEN, INSTANCE and, when
set, VMR_CONSOLE_SCREENSHOT (a PNG path)."""

import os
import statistics
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

URL = os.environ["CONSOLE_URL"]
TOKEN = os.environ["TOKEN"]
INSTANCE = os.environ["INSTANCE"]


def wait(f, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        v = f()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit("timed out")


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    d.get(URL + "/")
    d.execute_script("sessionStorage.setItem('vmr.token', arguments[0])", TOKEN)
    rows = []
    for i in range(6):
        t0 = time.time()
        d.get("about:blank")
        d.get(URL + "/#instance=" + INSTANCE)
        r = wait(lambda: d.execute_script("return window.vmr && window.vmr.lastRender"))
        wall = (time.time() - t0) * 1000
        nav = d.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return n ? n.domContentLoadedEventEnd : null")
        rows.append((r["requestMs"], r["renderMs"], r["totalMs"], nav or 0, wall, r["buckets"]))
    # The first load warms the browser; report the rest.
    rest = rows[1:]
    med = lambda k: statistics.median(x[k] for x in rest)
    print("page load in headless Chromium (1280x800), median of %d loads:" % len(rest))
    print("| timeline request ms | draw ms | request to drawn ms | DOMContentLoaded ms | navigation to drawn ms (wall) | buckets drawn |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("| %.1f | %.1f | %.1f | %.1f | %.1f | %d |" % (med(0), med(1), med(2), med(3), med(4), rest[0][5]))
    worst = max(x[2] for x in rest)
    print("worst request to drawn: %.1f ms (budget 1000 ms): %s" % (worst, "ok" if worst < 1000 else "OVER BUDGET"))
    shot = os.environ.get("VMR_CONSOLE_SCREENSHOT")
    if shot:
        d.save_screenshot(shot)
    if worst >= 1000:
        raise SystemExit(1)
finally:
    d.quit()
