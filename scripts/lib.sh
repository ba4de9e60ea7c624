# Shared helpers for vmreplay's scripts. Source it; don't run it.

VMR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VMR_CACHE="${VMR_CACHE:-$HOME/.cache/vmreplay}"
TANSU_VERSION="0.6.0"
TANSU_DIR="$VMR_CACHE/tansu-$TANSU_VERSION"
VMR_TANSU="${VMR_TANSU:-$TANSU_DIR/bin/tansu}"
export VMR_ROOT VMR_CACHE VMR_TANSU

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root (directly when we are root, else through sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
