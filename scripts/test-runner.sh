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

# The bound is a plain sleep, a direct child, so both pids are known before
# either can end (a watchdog subshell that is stopped before it has started
# its sleep has nothing safe to kill). Its stdio is not the binary's, so it
# holds no pipe cargo waits on.
sleep "$limit" </dev/null >/dev/null 2>&1 &
nap=$!
ended=
wait -n -p ended "$pid" "$nap"
rc=$?
if [ "$ended" = "$nap" ] && kill -0 "$pid" 2>/dev/null; then
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
    wait "$pid" 2>/dev/null
    exit 124
fi
kill "$nap" 2>/dev/null
wait "$nap" 2>/dev/null
exit "$rc"
