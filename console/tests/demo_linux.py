#!/usr/bin/env python3
"""Drives the web console in headless Chromium with selenium, against the
recorded demo-linux instance of console/tests/demo_linux.rs (see
console_driver.py for the line protocol).
"""

import os
import time

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from console_driver import (Failed, ask, body_keys, clone_api, el, instance_ids, passed, run, shot,
                            shown_clone, sign_in, start_replay, state_line, text, visible, wait)

URL = os.environ["CONSOLE_URL"]
TOKEN_A = os.environ["TOKEN_A"]
TOKEN_B = os.environ["TOKEN_B"]
TOKEN_EXPIRED = os.environ["TOKEN_EXPIRED"]
EXPIRED_AT = os.environ["EXPIRED_AT"]
INSTANCE = os.environ["INSTANCE"]
SNAP_IDS = os.environ["SNAP_IDS"].split(",")
SNAP_CUTS = [int(x) for x in os.environ["SNAP_CUTS"].split(",")]
SNAP_TIMES = [int(x) for x in os.environ["SNAP_TIMES"].split(",")]
POISON_SEQ = int(os.environ["POISON_SEQ"])
LAST_SEQ = int(os.environ["LAST_SEQ"])
CRASH_SEQ = int(os.environ["CRASH_SEQ"])
CRASH_NS = int(os.environ["CRASH_NS"])
GHOST = "kv-ghost-2"
US = 1000


def delete_clone(d):
    el(d, "c-delete").click()
    wait("the clone to go", lambda: shown_clone(d) is None, 120)


def main(d):
    # A token the console does not know: a clear message, then recovery.
    d.get(URL + "/#instance=" + INSTANCE)
    sign_in(d, "not-a-valid-token-123")
    wait("the refused-token message", lambda: "not accepted" in text(d, "signin-error"))
    shot(d, "console-bad-token.png")
    passed("an unknown token is refused with %r" % text(d, "signin-error"))

    # An expired token: the console says so and when; a valid one recovers.
    sign_in(d, TOKEN_EXPIRED)
    wait("the expired-token message",
         lambda: "expired at " + EXPIRED_AT in text(d, "signin-error"))
    shot(d, "console-token-expired.png")
    passed("an expired token is refused with %r" % text(d, "signin-error"))
    sign_in(d, TOKEN_A)
    wait("the sign-in to close", lambda: not visible(d, "signin"))
    wait("instance %s in the list" % INSTANCE, lambda: INSTANCE in instance_ids(d))
    if "other-1" in instance_ids(d):
        raise Failed("tenant demo sees other-1: %s" % instance_ids(d))
    passed("after the expired token a valid one signs in; tenant demo lists %s and not the other tenant's other-1"
           % INSTANCE)

    # The timeline: both snapshots at their manifests' times, the crash at
    # the recorded crash's time.
    wait("the timeline", lambda: visible(d, "view") and text(d, "inst-title") == INSTANCE)
    wait("both snapshots and the crash among the markers",
         lambda: all(s in text(d, "markers") for s in ["snapshot " + i for i in SNAP_IDS] + ["crash: crash"]), 60)
    snaps = d.find_elements(By.CSS_SELECTOR, "#snapshots li")
    if len(snaps) != 2:
        raise Failed("expected 2 snapshots listed, got %d" % len(snaps))
    tl = d.execute_script("return window.vmr.tl")
    # Times in ns are JavaScript numbers on the page (doubles: about 256 ns
    # apart at today's epoch), so they are compared to the microsecond.
    got = sorted((s["snapshot_id"], s["seq_at_cut"], s["t"]) for s in tl["snapshots"])
    want = sorted(zip(SNAP_IDS, SNAP_CUTS, SNAP_TIMES))
    if [g[:2] for g in got] != [w[:2] for w in want] or any(abs(g[2] - w[2]) > US for g, w in zip(got, want)):
        raise Failed("the timeline's snapshots %s, the store's manifests %s" % (got, want))
    crashes = [m for m in tl["markers"] if m["kind"] == "crash"]
    if len(crashes) != 1 or crashes[0]["seq"] != CRASH_SEQ or abs(crashes[0]["t"] - CRASH_NS) > US:
        raise Failed("crash markers %s; the recorded crash is seq %d at %d ns" % (crashes, CRASH_SEQ, CRASH_NS))
    if not (tl["from_ns"] <= CRASH_NS <= tl["to_ns"]):
        raise Failed("the crash at %d is outside the timeline [%d, %d]" % (CRASH_NS, tl["from_ns"], tl["to_ns"]))
    kinds = sorted("%s %s %s" % (s["kind"], s["device"], s["direction"]) for s in tl["series"])
    for k in ("net net0 rx", "net net0 tx", "block vda write"):
        if not any(x.startswith(k) for x in kinds):
            raise Failed("no %s series on the timeline: %s" % (k, kinds))
    if any("frame" in s or "data" in s for s in tl["series"]):
        raise Failed("the overview carries raw event data")
    passed("the timeline of %s shows snapshots %s at their cuts (seq %s) and the crash at seq %d, its recorded time "
           "(series %s)" % (INSTANCE, SNAP_IDS, SNAP_CUTS, CRASH_SEQ, kinds))
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
    rows = wait("events of the selected range", lambda: d.find_elements(By.CSS_SELECTOR, "#events tbody tr"), 60)
    table = text(d, "events")
    for needle in ("PUT ", "7000", "net0", "vda"):
        if needle not in table:
            raise Failed("the range view lacks %r:\n%s" % (needle, table[:2000]))
    passed("a selected range lists %d decoded events (vda block I/O, net0 frames with port 7000 and the PUT "
           "payload previews)" % len(rows))
    shot(d, "console-events.png")

    # A replay from snapshot A, created paused: step, resume, pause from the page.
    cl = start_replay(d, SNAP_IDS[0], speed=1, paused=True)
    cid = cl["clone_id"]
    wait("the clone ready", lambda: shown_clone(d)["state"] == "ready", 240)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_READY" or api.get("snapshot_id") != SNAP_IDS[0] \
            or api.get("seq_at_cut") != SNAP_CUTS[0]:
        raise Failed("a clone of A created paused: the replayer says %s" % api)
    body_keys(d, "s")
    wait("one event delivered on the page", lambda: shown_clone(d)["delivered"] == 1, 60)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_PAUSED" or api.get("delivered") != 1:
        raise Failed("step from the page: the replayer says %s" % api)
    el(d, "c-step").click()
    wait("a second step", lambda: shown_clone(d)["delivered"] == 2, 60)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_PAUSED" or api.get("delivered") != 2:
        raise Failed("the Step button: the replayer says %s" % api)
    passed("S and the Step button each deliver one recorded event; the replayer reports %s, delivered %d, "
           "replayed seq %d" % (api["state"], api["delivered"], api["replayed_seq"]))
    body_keys(d, " ")
    wait("the page to show it replaying",
         lambda: shown_clone(d)["state"] == "replaying" or shown_clone(d)["delivered"] > 2, 30)
    body_keys(d, " ")
    wait("the page to show it paused", lambda: shown_clone(d)["state"] == "paused", 30)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_PAUSED":
        raise Failed("Space to pause: the replayer says %s" % api)
    d1 = api["delivered"]
    time.sleep(1.5)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_PAUSED" or api.get("delivered") != d1:
        raise Failed("a paused replay delivered more: %d, then %s" % (d1, api))
    passed("Space resumes and pauses; the replayer reports PAUSED, delivered %d and unchanged 1.5 s later" % d1)

    # Switch the clone to snapshot B from the page; it runs to the crash.
    Select(el(d, "r-snapshot")).select_by_value(SNAP_IDS[1])
    box = el(d, "r-paused")
    if box.is_selected():
        box.click()
    el(d, "c-switch").click()
    wait("the switch on the page", lambda: shown_clone(d).get("snapshot_id") == SNAP_IDS[1], 240)
    api = clone_api(cid)
    if api.get("snapshot_id") != SNAP_IDS[1] or api.get("seq_at_cut") != SNAP_CUTS[1] or api.get("switches") != 1:
        raise Failed("switch from the page: the replayer says %s" % api)
    passed("Switch snapshot moves clone %s to %s (seq %d); the replayer reports %d switch"
           % (cid, SNAP_IDS[1], SNAP_CUTS[1], api["switches"]))
    wait("the clone to crash", lambda: shown_clone(d)["state"] == "crashed", 300)
    api = clone_api(cid)
    # GetClone's replayed seq counts the recorded crash event too (the only
    # event after the last device input); the crash itself is reported with
    # the last recorded input applied, checked on the page's marker below.
    if api.get("state") != "CLONE_STATE_CRASHED" or api.get("replayed_seq") not in (LAST_SEQ, CRASH_SEQ):
        raise Failed("the clone did not crash after the original's last recorded seq %d (poison frame %d): %s"
                     % (LAST_SEQ, POISON_SEQ, api))
    wait("the clone's crash marker", lambda: "clone crash" in text(d, "markers"), 30)
    wait("the crashed state on the page", lambda: "crashed" in state_line(d), 10)
    cc = d.execute_script("return window.vmr.cloneCrash && Object.assign({}, window.vmr.cloneCrash)")
    if not cc or cc.get("seq") != LAST_SEQ:
        raise Failed("the page's clone crash marker %s; the original's last seq is %d" % (cc, LAST_SEQ))
    passed("the clone runs to the same crash: the replayer reports CRASHED (replayed seq %d, recorded crash %d); "
           "the page marks the clone crash after seq %d, the original's last input (packet of death at %d)"
           % (api["replayed_seq"], CRASH_SEQ, cc["seq"], POISON_SEQ))
    shot(d, "console-replay-crash.png")
    delete_clone(d)

    # Go live from the page: the clone's service answers in its namespace.
    cl = start_replay(d, SNAP_IDS[0], paused=True)
    cid = cl["clone_id"]
    wait("the clone ready", lambda: shown_clone(d)["state"] == "ready", 240)
    el(d, "c-step").click()
    wait("a step", lambda: shown_clone(d)["state"] == "paused" and shown_clone(d)["delivered"] == 1, 60)
    el(d, "c-live").click()
    wait("the live clone on the page", lambda: shown_clone(d)["state"] == "live", 60)
    wait("the access hint", lambda: shown_clone(d).get("access_hint"), 20)
    api = clone_api(cid)
    if api.get("state") != "CLONE_STATE_LIVE" or not api.get("netns"):
        raise Failed("go live from the page: the replayer says %s" % api)
    reply = ask("kv %s GET 0" % api["netns"])
    if reply != "VAL 0 a0 v0":
        raise Failed("the live clone's service in %s answered %r" % (api["netns"], reply))
    passed("Go live: the replayer reports LIVE; GET 0 in %s answers %r (the page's access hint: %s)"
           % (api["netns"], reply, shown_clone(d)["access_hint"][:100]))
    shot(d, "console-live.png")
    delete_clone(d)

    # The replayer goes away mid-replay, then returns.
    cl = start_replay(d, SNAP_IDS[0], speed=0.1)
    cid = cl["clone_id"]
    wait("the clone replaying", lambda: shown_clone(d)["state"] == "replaying", 240)
    ask("stop-replayer")
    wait("the replayer-unreachable message", lambda: "Replayer unreachable" in text(d, "banner"), 60)
    shot(d, "console-replayer-down.png")
    passed("the replayer going away mid-replay shows %r" % text(d, "banner")[:120])
    ask("start-replayer")
    wait("the message to clear", lambda: not visible(d, "banner") or "Replayer unreachable" not in text(d, "banner"), 60)
    wait("the lost clone to be reported", lambda: "no longer known" in text(d, "c-detail"), 60)
    cl = start_replay(d, SNAP_IDS[1], paused=True)
    wait("the new clone ready", lambda: shown_clone(d)["state"] == "ready", 240)
    api = clone_api(cl["clone_id"])
    if api.get("state") != "CLONE_STATE_READY":
        raise Failed("after the replayer returned: %s" % api)
    passed("the page recovers when the replayer returns: clone %s is reported lost, a new one is %s"
           % (cid, api["state"]))
    delete_clone(d)

    # An unknown instance in the URL, until it starts recording.
    d.execute_script("location.hash = 'instance=%s'" % GHOST)
    wait("the unknown-instance message", lambda: visible(d, "instance-error") and GHOST in text(d, "instance-error-text"))
    shot(d, "console-unknown-instance.png")
    passed("an unknown instance in the URL shows %r" % text(d, "instance-error-text"))
    ask("produce " + GHOST)
    wait("the timeline of %s" % GHOST, lambda: visible(d, "view") and text(d, "inst-title") == GHOST, 30)
    wait("its empty snapshot state", lambda: "No snapshots yet" in text(d, "snapshots-empty"))
    passed("the page shows %s once it is recorded (and 'No snapshots yet.')" % GHOST)

    # The other tenant.
    el(d, "signout").click()
    sign_in(d, TOKEN_B)
    wait("the sign-in to close", lambda: not visible(d, "signin"))
    wait("other-1 in the list", lambda: "other-1" in instance_ids(d))
    ids = instance_ids(d)
    if INSTANCE in ids or GHOST in ids:
        raise Failed("tenant other sees demo instances: %s" % ids)
    d.execute_script("location.hash = 'instance=%s'" % INSTANCE)
    wait("the unknown-instance message for the other tenant",
         lambda: visible(d, "instance-error") and INSTANCE in text(d, "instance-error-text"))
    passed("tenant other lists only other-1; %s is unknown to it" % INSTANCE)


if __name__ == "__main__":
    run(main)
