#!/usr/bin/env python3
"""Drives the web console in headless Chromium with selenium, against the
microVM recording of console/tests/browser.rs (see console_driver.py for the
line protocol).
"""

import os

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from console_driver import (Failed, ask, body_keys, clone_api, el, instance_ids, passed, run, shot,
                            shown_clone, sign_in, start_replay, state_line, text, visible, wait)

URL = os.environ["CONSOLE_URL"]
TOKEN_A = os.environ["TOKEN_A"]
TOKEN_B = os.environ["TOKEN_B"]
INSTANCE = os.environ["INSTANCE"]
CUTS = [int(x) for x in os.environ["CUTS"].split(",")]
POISON_SEQ = int(os.environ["POISON_SEQ"])
CRASH_SEQ = int(os.environ["CRASH_SEQ"])


def main(d):
    # A token the console does not accept: a clear message, then recovery.
    d.get(URL + "/#instance=" + INSTANCE)
    sign_in(d, "not-a-valid-token-123")
    wait("the refused-token message", lambda: "not accepted" in text(d, "signin-error"))
    shot(d, "console-bad-token.png")
    passed("an invalid token is refused with a clear message")
    sign_in(d, TOKEN_A)
    wait("the sign-in to close", lambda: not visible(d, "signin"))
    wait("instance %s in the list" % INSTANCE, lambda: INSTANCE in instance_ids(d))
    if "other-1" in instance_ids(d):
        raise Failed("tenant shop sees other-1: %s" % instance_ids(d))
    passed("tenant shop lists %s and not the other tenant's other-1" % INSTANCE)

    # The timeline: both snapshots and the crash.
    wait("the timeline", lambda: visible(d, "view"))
    wait("both snapshots and the crash among the markers",
         lambda: all(s in text(d, "markers") for s in ("snapshot 0001", "snapshot 0002", "crash: triple_fault")))
    snaps = d.find_elements(By.CSS_SELECTOR, "#snapshots li")
    if len(snaps) != 2:
        raise Failed("expected 2 snapshots listed, got %d" % len(snaps))
    tl = d.execute_script("return window.vmr.tl")
    kinds = sorted("%s %s %s" % (s["kind"], s["device"], s["direction"]) for s in tl["series"])
    if not any(k.startswith("net net0 rx") for k in kinds):
        raise Failed("no net0 rx series on the timeline: %s" % kinds)
    if any("frame" in s or "data" in s for s in tl["series"]):
        raise Failed("the overview carries raw event data")
    passed("the timeline of %s shows snapshots 0001, 0002 and its triple fault (series %s)" % (INSTANCE, kinds))
    shot(d, "console-timeline.png")

    # Zoom in with the keyboard, back with 0.
    span0 = tl["to_ns"] - tl["from_ns"]
    body_keys(d, "+")
    wait("a zoomed view", lambda: (lambda t: t["to_ns"] - t["from_ns"] < span0 * 0.75)(d.execute_script("return window.vmr.tl")))
    body_keys(d, "0")
    wait("the whole recording again", lambda: d.execute_script("return window.vmr.view") is None)
    passed("zoom in and back to the whole recording")

    # Select the whole range: the decoded events.
    c = el(d, "timeline")
    w = c.size["width"]
    ActionChains(d).move_to_element_with_offset(c, -w // 2 + 122, 0).key_down(Keys.SHIFT).click_and_hold() \
        .move_by_offset(w - 112, 0).release().key_up(Keys.SHIFT).perform()
    rows = wait("events of the selected range",
                lambda: d.find_elements(By.CSS_SELECTOR, "#events tbody tr"), 30)
    table = text(d, "events")
    for needle in ("POISON", "net0", "rx", "0x88b5", "vda"):
        if needle not in table:
            raise Failed("the range view lacks %r:\n%s" % (needle, table[:2000]))
    passed("a selected range lists %d decoded events (block op/sector/len, frames with payload preview)" % len(rows))
    shot(d, "console-events.png")

    # A replay from snapshot 0001 at 0.2x: pause and step from the page.
    cl = start_replay(d, "0001", speed=0.2)
    cid = cl["clone_id"]
    wait("the clone to replay", lambda: shown_clone(d)["state"] in ("replaying", "paused"), 60)
    body_keys(d, " ")
    wait("the page to show it paused", lambda: shown_clone(d)["state"] == "paused", 20)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_PAUSED":
        raise Failed("pause from the page: the replayer says %s" % api)
    passed("Space pauses the replay; the replayer reports %s" % api["state"])
    d0 = api["delivered"]
    body_keys(d, "s")
    wait("one more event delivered on the page", lambda: shown_clone(d)["delivered"] == d0 + 1, 20)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_PAUSED" or api.get("delivered") != d0 + 1:
        raise Failed("step from the page: the replayer says %s (delivered before: %d)" % (api, d0))
    el(d, "c-step").click()
    wait("a second step", lambda: shown_clone(d)["delivered"] == d0 + 2, 20)
    api = clone_api(cid)
    if api.get("delivered") != d0 + 2:
        raise Failed("the Step button: the replayer says %s" % api)
    passed("S and the Step button each deliver one event; the replayer reports delivered %d, replayed seq %d"
           % (api["delivered"], api["replayed_seq"]))

    # Faster, resume, and run to the crash.
    sp = el(d, "c-speed")
    sp.clear()
    sp.send_keys("20")
    el(d, "c-speed-go").click()
    wait("speed 20x", lambda: shown_clone(d).get("speed") == 20, 20)
    body_keys(d, " ")
    wait("the clone to crash", lambda: shown_clone(d)["state"] == "crashed", 120)
    api = clone_api(cid)
    # The last event applied is the poison frame, or the recorded crash
    # itself (the only event after it) when it was due before the clone's
    # crash was seen.
    if api.get("state") != "CLONE_STATE_CRASHED" or api.get("replayed_seq") not in (POISON_SEQ, CRASH_SEQ):
        raise Failed("the clone did not crash at the poison frame (seq %d): %s" % (POISON_SEQ, api))
    wait("the clone's crash marker", lambda: "clone crash" in text(d, "markers"), 20)
    wait("the crashed state on the page", lambda: "crashed" in state_line(d), 10)
    console_out = text(d, "c-console")
    passed("the clone runs to the same crash (replayed seq %d; poison frame %d, recorded crash %d); the page marks it (console: %d chars)"
           % (api["replayed_seq"], POISON_SEQ, CRASH_SEQ, len(console_out)))
    shot(d, "console-replay-crash.png")
    el(d, "c-delete").click()
    wait("the clone to go", lambda: shown_clone(d) is None, 30)

    # The replayer goes away mid-replay, then returns.
    cl = start_replay(d, "0002", speed=0.1)
    cid = cl["clone_id"]
    ask("stop-replayer")
    wait("the replayer-unreachable message", lambda: "Replayer unreachable" in text(d, "banner"), 30)
    shot(d, "console-replayer-down.png")
    passed("the replayer going away mid-replay shows %r" % text(d, "banner")[:120])
    ask("start-replayer")
    wait("the message to clear", lambda: not visible(d, "banner") or "Replayer unreachable" not in text(d, "banner"), 30)
    wait("the lost clone to be reported", lambda: "no longer known" in text(d, "c-detail"), 30)
    cl = start_replay(d, "0002", paused=True)
    wait("the new clone ready", lambda: shown_clone(d)["state"] == "ready", 60)
    api = clone_api(cl["clone_id"])
    if api.get("state") != "CLONE_STATE_READY":
        raise Failed("after the replayer returned: %s" % api)
    passed("the page recovers when the replayer returns: a new clone is %s" % api["state"])
    el(d, "c-delete").click()
    wait("the clone to go", lambda: shown_clone(d) is None, 30)

    # An unknown instance in the URL, until it starts recording.
    d.execute_script("location.hash = 'instance=shop-2'")
    wait("the unknown-instance message", lambda: visible(d, "instance-error") and "shop-2" in text(d, "instance-error-text"))
    shot(d, "console-unknown-instance.png")
    passed("an unknown instance in the URL shows %r" % text(d, "instance-error-text"))
    ask("produce-shop-2")
    wait("the timeline of shop-2", lambda: visible(d, "view") and text(d, "inst-title") == "shop-2", 30)
    wait("shop-2's empty snapshot state", lambda: "No snapshots yet" in text(d, "snapshots-empty"))
    passed("the page shows shop-2 once it is recorded (and 'No snapshots yet.')")

    # The other tenant.
    el(d, "signout").click()
    sign_in(d, TOKEN_B)
    wait("the sign-in to close", lambda: not visible(d, "signin"))
    wait("other-1 in the list", lambda: "other-1" in instance_ids(d))
    ids = instance_ids(d)
    if INSTANCE in ids or "shop-2" in ids:
        raise Failed("tenant other sees shop instances: %s" % ids)
    d.execute_script("location.hash = 'instance=%s'" % INSTANCE)
    wait("the unknown-instance message for the other tenant",
         lambda: visible(d, "instance-error") and INSTANCE in text(d, "instance-error-text"))
    passed("tenant other lists only other-1; %s is unknown to it" % INSTANCE)

    # A token that stops being accepted during a session.
    d.execute_script("sessionStorage.setItem('vmr.token', 'revoked-token-0000000')")
    d.refresh()
    wait("the refused-token message after reload", lambda: visible(d, "signin") and "not accepted" in text(d, "signin-error"))
    sign_in(d, TOKEN_A)
    wait("the timeline after signing in again", lambda: visible(d, "view") and text(d, "inst-title") == INSTANCE)
    passed("a revoked token sends the page to the sign-in; a valid one brings the timeline back")


if __name__ == "__main__":
    run(main)
