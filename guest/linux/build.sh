#!/usr/bin/env bash
# Builds the Linux guest image: Debian's cloud kernel plus a busybox initramfs
# whose /init runs the demo workloads (guest/linux/init) and the key-value
# service (guest/linux/kv-handler). The result is cached:
#
#   $VMR_CACHE/guest-linux-<kernel-abi>-<pkg-version>-<hash>/
#       vmlinuz, initramfs.cpio.gz,
#       image.toml   machine-image manifest of the demo-linux image (format 1)
#       manifest     build facts (kernel package, source hash, modules)
#   $VMR_CACHE/guest-linux            -> symlink to the newest build
#   $VMR_CACHE/demo-linux             -> the same directory
#
# where VMR_CACHE defaults to ~/.cache/vmreplay and <hash> covers this script and
# the files under guest/linux. The kernel .deb is downloaded once with
# `apt-get download` (never installed) and kept in $VMR_CACHE/debs, so later
# builds work offline.
#
#   guest/linux/build.sh            build (or reuse) and print the image directory
#   guest/linux/build.sh --force    rebuild even if cached
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMR_CACHE:-$HOME/.cache/vmreplay}"
DEBS="$CACHE/debs"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

log() { printf '[guest-linux] %s\n' "$*" >&2; }
die() { printf '[guest-linux] error: %s\n' "$*" >&2; exit 1; }

for tool in dpkg-deb cpio gzip sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (install it: apt-get install dpkg cpio gzip coreutils)"
done
BUSYBOX="${VMR_BUSYBOX:-/bin/busybox}"
[ -x "$BUSYBOX" ] || die "busybox not found at $BUSYBOX (apt-get install busybox-static)"
case "$(ldd "$BUSYBOX" 2>&1 || true)" in *"not a dynamic"*) ;; *)
    die "$BUSYBOX is not statically linked (apt-get install busybox-static)" ;;
esac

mkdir -p "$DEBS"

# 1. Pick the kernel: the current dependency of linux-image-cloud-amd64, or,
#    offline, the newest .deb already cached.
kpkg=""
if kpkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)" && [ -n "$kpkg" ]; then
    deb="$(ls -1 "$DEBS"/"${kpkg}"_*_amd64.deb 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -z "$deb" ]; then
        log "downloading $kpkg (once)"
        (cd "$DEBS" && apt-get download "$kpkg" >&2) ||
            die "apt-get download $kpkg failed (is the Debian mirror reachable? run apt-get update)"
        deb="$(ls -1 "$DEBS"/"${kpkg}"_*_amd64.deb | sort -V | tail -n1)"
    fi
else
    deb="$(ls -1 "$DEBS"/linux-image-*-cloud-amd64_*_amd64.deb 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$deb" ] || die "cannot resolve linux-image-cloud-amd64 (apt-cache) and no kernel .deb is cached in $DEBS"
    log "apt metadata unavailable; using cached $(basename "$deb")"
fi
debname="$(basename "$deb" .deb)"            # linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64
kabi="${debname#linux-image-}"; kabi="${kabi%%_*}" # 6.1.0-56-cloud-amd64
pkgver="${debname#*_}"; pkgver="${pkgver%_amd64}"  # 6.1.192-2

# 2. Cache key: kernel package + hash of everything that shapes the image.
srchash="$( (cat "$HERE/build.sh" "$HERE/init" "$HERE/kv-handler"; sha256sum "$BUSYBOX" | cut -d' ' -f1) | sha256sum | cut -c1-12)"
OUT="$CACHE/guest-linux-${kabi%-cloud-amd64}-${pkgver}-${srchash}"
if [ "$FORCE" = 0 ] && [ -f "$OUT/manifest" ] && [ -f "$OUT/image.toml" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    log "cached: $OUT"
    ln -sfn "$(basename "$OUT")" "$CACHE/guest-linux"
    ln -sfn "$(basename "$OUT")" "$CACHE/demo-linux"
    echo "$OUT"
    exit 0
fi

# 3. Extract the kernel and the modules /init loads: virtio, virtio_pci,
#    virtio_blk and virtio_net, and pvpanic with both its front ends
#    (pvpanic_mmio for QEMU's ISA `-device pvpanic`, found through ACPI as
#    QEMU0001; pvpanic_pci for `-device pvpanic-pci`). All are modules in
#    Debian's cloud config (CONFIG_PVPANIC_MMIO=m, CONFIG_PVPANIC_PCI=m).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "extracting $(basename "$deb")"
dpkg-deb -x "$deb" "$work/deb"
vmlinuz="$work/deb/boot/vmlinuz-$kabi"
[ -f "$vmlinuz" ] || die "no /boot/vmlinuz-$kabi in $(basename "$deb")"
moddir="$work/deb/lib/modules/$kabi"
[ -d "$moddir" ] || die "no /lib/modules/$kabi in $(basename "$deb")"

declare -A modpath=()
while IFS= read -r -d '' ko; do
    name="$(basename "$ko" .ko)"; modpath[${name//-/_}]="$ko"
done < <(find "$moddir/kernel" -name '*.ko' -print0)

# Loads a module after its dependencies (read from the module's .modinfo).
declare -A seen=()
order=()
want() {
    local m="$1"
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    local ko="${modpath[$m]:-}"
    if [ -z "$ko" ]; then
        grep -q "/$m.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
        die "module $m is neither built in nor shipped in $(basename "$deb")"
    fi
    local deps
    deps="$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1)"
    local d
    for d in ${deps//,/ }; do want "${d//-/_}"; done
    order+=("$m")
}
for m in virtio_pci virtio_blk virtio_net pvpanic_mmio pvpanic_pci; do want "$m"; done
log "modules: ${order[*]}"

# 4. The initramfs.
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,mnt}
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
for m in "${order[@]}"; do cp "${modpath[$m]}" "$root/lib/modules/$m.ko"; done
printf '%s\n' "${order[@]}" >"$root/lib/modules/load-order"
install -m 0755 "$HERE/init" "$root/init"
install -m 0755 "$HERE/kv-handler" "$root/bin/vmr-kv-handler"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
fi
(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet --owner 0:0) |
    gzip -9n >"$work/initramfs.cpio.gz"

# 5. Publish atomically.
stage="$OUT.tmp.$$"
rm -rf "$stage"; mkdir -p "$stage"
cp "$vmlinuz" "$stage/vmlinuz"
cp "$work/initramfs.cpio.gz" "$stage/initramfs.cpio.gz"
cat >"$stage/manifest" <<EOF
kernel_package=linux-image-$kabi
kernel_version=$pkgver
kernel_release=$kabi
source_hash=$srchash
modules=${order[*]}
busybox=$("$BUSYBOX" 2>&1 | head -n1)
EOF
# The machine-image manifest (docs/guest-images.md): the demo-linux image runs
# the key-value service; its panic reaches QEMU through the pvpanic device.
# panic=0: a panicked kernel waits (never reboots), so the hypervisor sees the
# pvpanic report and the guest stays for inspection.
cat >"$stage/image.toml" <<EOF
format_version = 1
name = "demo-linux"
description = "Debian $kabi ($pkgver) with a busybox initramfs running the vmr-kv-1 key-value service; a PUT with a key over 200 bytes panics the kernel"
drivers = ["qemu"]

[boot]
kernel = "vmlinuz"
initrd = "initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=0 loglevel=4 vmr.workload=service vmr.ip=192.168.77.2/24 vmr.peer=192.168.77.1 vmr.service_port=7000"

[machine]
memory_mib = 256
vcpus = 1
qemu_devices = ["pvpanic"]

[[disks]]
name = "vda"
size_mib = 64

[[nics]]
name = "net0"
mac = "52:54:00:77:00:02"
ip = "192.168.77.2/24"
peer = "192.168.77.1"

[service]
port = 7000
protocol = "vmr-kv-1"
EOF
rm -rf "$OUT"; mv "$stage" "$OUT"
ln -sfn "$(basename "$OUT")" "$CACHE/guest-linux"
ln -sfn "$(basename "$OUT")" "$CACHE/demo-linux"
log "built $OUT"
echo "$OUT"
