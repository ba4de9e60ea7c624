#!/usr/bin/env bash
# The runner scripts/test.sh gives cargo for every test binary: it runs the
# binary with a bound, so a test that stops making progress fails with its
# threads' backtraces instead of holding up the rest of the suite.
#
#   VMR_TEST_BINARY_TIMEOUT   seconds one test binary may run (default 900;
#                             the slowest binary takes about 300)
#
# Past the bound it prints every thread's backtrace (gdb), then kills every
# process of the binary's session (the binary and whatever it started that
# did not start a session of its own) and exits 124; cargo reports the
# binary as failed and, with --no-fail-fast, goes on with the next one.
set -uo pipefail

limit="${VMR_TEST_BINARY_TIMEOUT:-900}"
name="$(basename "$1")"

# A session of its own, so a timeout can take down everything it started
# (harnessed children get process groups of their own, in this session).
setsid -w "$@" &
pid=$!

kill_all() {
    # Everything in the binary's session, then its process group.
    if command -v pkill >/dev/null; then
        pkill "-$1" -s "$pid" 2>/dev/null
    fi
    kill "-$1" -- "-$pid" 2>/dev/null
}

trap 'kill_all TERM; sleep 2; kill_all KILL' INT TERM
marker="$(mktemp)"
(
    nap=
    trap 'kill "${nap:-0}" 2>/dev/null; exit 0' TERM
    sleep "$limit" </dev/null >/dev/null 2>&1 &
    nap=$!
    wait "$nap"
    kill -0 "$pid" 2>/dev/null || exit 0
    echo 1 >"$marker"
    echo >&2
    echo "TIMEOUT: test binary $name ran past ${limit}s (VMR_TEST_BINARY_TIMEOUT);" \
        "the test it last named above did not finish. Its threads:" >&2
    if command -v gdb >/dev/null; then
        timeout 60 gdb -batch -nx -ex "thread apply all bt 30" -p "$pid" >&2 2>&1 \
            || echo "(gdb could not attach)" >&2
    else
        echo "(gdb is not installed, so no backtraces)" >&2
    fi
    kill_all TERM
    sleep 2
    kill_all KILL
) &
watchdog=$!
wait "$pid"
rc=$?
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
if [ -s "$marker" ]; then
    rc=124
    # What the binary started may still be exiting.
    kill_all KILL
fi
rm -f "$marker"
exit "$rc"
