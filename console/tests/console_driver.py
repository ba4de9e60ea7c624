"""Shared by the console's selenium drivers (browser.py, demo_linux.py).

A driver prints `PASS <check>` per check, `FAIL <check>: <why>` and stops
at the first failure, `DONE` at the end. It asks the Rust side for things a
browser cannot do with `ACTION <what>` lines and reads one answer line from
stdin. Screenshots go to $SCREENSHOTS, a failure's to $FAILURE_DIR.
"""

import json
import os
import sys
import time
import traceback

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select


class Failed(Exception):
    pass


def out(line):
    print(line, flush=True)


def ask(what):
    out("ACTION " + what)
    line = sys.stdin.readline()
    if not line:
        raise Failed("the test harness went away")
    return line.strip()


def passed(name):
    out("PASS " + name)


def wait(what, f, timeout=30.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = f()
            if v:
                return v
        except WebDriverException as e:
            last = e
        time.sleep(0.2)
    raise Failed("timed out after %.0f s waiting for %s%s" % (timeout, what, " (%s)" % last if last else ""))


def shot(d, name):
    d.save_screenshot(os.path.join(os.environ["SCREENSHOTS"], name))


def el(d, id_):
    return d.find_element(By.ID, id_)


def text(d, id_):
    return el(d, id_).text


def visible(d, id_):
    return el(d, id_).is_displayed()


def sign_in(d, token):
    wait("the sign-in form", lambda: visible(d, "signin"))
    t = el(d, "token")
    t.clear()
    t.send_keys(token)
    el(d, "signin-button").click()


def instance_ids(d):
    # Read in one script: the list may be re-rendered between two element reads.
    return d.execute_script("return Array.from(document.querySelectorAll('#instances li'), li => li.dataset.id)")


def clone_api(clone_id):
    """The replayer's own view of a clone (GetClone over gRPC)."""
    return json.loads(ask("get-clone " + clone_id))


def state_line(d):
    return text(d, "c-state")


def shown_clone(d):
    return d.execute_script("return window.vmr.clone && Object.assign({}, window.vmr.clone)")


def body_keys(d, keys):
    # Keyboard shortcuts act on the page, not on a form field.
    d.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(d).send_keys(keys).perform()


def start_replay(d, snapshot, speed=None, paused=False):
    Select(el(d, "r-snapshot")).select_by_value(snapshot)
    sp = el(d, "r-speed")
    sp.clear()
    sp.send_keys(str(speed or 1))
    box = el(d, "r-paused")
    if box.is_selected() != paused:
        box.click()
    before = (shown_clone(d) or {}).get("clone_id")
    el(d, "r-start").click()
    return wait("a new clone on the page",
                lambda: (shown_clone(d) or {}).get("clone_id") not in (None, before) and shown_clone(d), 180)


def run(main):
    """Runs `main(driver)` in headless Chromium at 1280x800; prints the verdict."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,800", "--hide-scrollbars"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_script_timeout(30)
    try:
        # A 1280x800 viewport, as on a small laptop screen.
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        main(d)
        out("DONE")
    except Failed as e:
        path = os.path.join(os.environ.get("FAILURE_DIR", "/tmp"), "console-failure.png")
        try:
            d.save_screenshot(path)
        except WebDriverException:
            pass
        out("FAIL %s (screenshot: %s)" % (e, path))
    except Exception:
        out("FAIL " + traceback.format_exc().replace("\n", " | "))
    finally:
        d.quit()
