#!/usr/bin/env bash
# The runner scripts/test.sh gives cargo for every test binary: it runs the
# binary with a bound, so a test that stops making progress fails with its
# threads' backtraces instead of holding up the rest of the suite.
#
#   VMR_TEST_BINARY_TIMEOUT   seconds one test binary may run (default 900;
#                             the slowest binary takes about 300)
#
# Past the bound it prints every thread's backtrace (gdb), then kills the
# binary's process group (the binary and whatever it started that stayed in
# it) and exits 124; cargo reports the binary as failed and, with
# --no-fail-fast, goes on with the next one.
set -uo pipefail

limit="${VMR_TEST_BINARY_TIMEOUT:-900}"
name="$(basename "$1")"

# A process group of its own, so a timeout can take down what it started.
setsid "$@" &
pid=$!
trap 'kill -TERM -- "-$pid" 2>/dev/null' INT TERM
marker="$(mktemp)"
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$limit" &
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
    kill -KILL -- "-$pid" 2>/dev/null
) &
watchdog=$!
wait "$pid"
rc=$?
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
if [ -s "$marker" ]; then
    rc=124
fi
rm -f "$marker"
exit "$rc"
