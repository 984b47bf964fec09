#!/usr/bin/env bash
# Build a bootable metald test guest from Debian packages only (cached).
#
#   scripts/guest-assets.sh [OUT_DIR]             build (or reuse) the assets
#   scripts/guest-assets.sh --selftest [OUT_DIR]  build, then boot under QEMU/TCG
#
# OUT_DIR defaults to ${METALD_ASSETS_DIR:-$PWD/.metald/assets}. Produces
#   vmlinux             uncompressed ELF kernel (PVH capable; Firecracker needs it)
#   bzImage             the same kernel as shipped by Debian
#   initramfs.cpio.gz   static busybox + scripts/guest/init + virtio/ext4 modules
#   disk.ext4           16 MiB ext4, label "metald-test", /metald-disk.txt
#   assets.env          METALD_GUEST_* lines to `source`
# The kernel is the current bookworm linux-image-<abi>-amd64; the guest loads
# the Debian modules it needs (virtio_mmio, virtio_blk, ext4, button, ...) itself.
# Reruns are a no-op (<1 s) while the kernel version and the hash of this script
# and scripts/guest/* are unchanged (recorded in OUT_DIR/.stamp).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
GUEST_SRC=$(dirname "$SCRIPT")/guest
SELFTEST=0
if [[ ${1:-} == --selftest ]]; then SELFTEST=1; shift; fi
OUT=${1:-${METALD_ASSETS_DIR:-$PWD/.metald/assets}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Modules wanted in the guest (module names; dependencies are added from
# modules.dep). Names missing from the package are built-in and skipped.
# crc32c is not a symbol dependency of ext4 but is needed to mount
# metadata_csum filesystems (mkfs.ext4's default).
MODULES=(virtio_mmio virtio_pci virtio_blk virtio_net virtio_console virtio_rng
	vmw_vsock_virtio_transport crc32c_generic crc32c_intel ext4 button evdev)

log() { echo "guest-assets: $*" >&2; }
die() { log "error: $*"; exit 1; }

# apt-get install the packages that are not installed; `apt-get update` only
# if the install fails (e.g. empty package lists on a fresh machine).
ensure() { # ensure pkg...
	local p missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
			missing+=("$p")
	done
	((${#missing[@]})) || return 0
	log "installing ${missing[*]}"
	apt-get install -y -q "${missing[@]}" >&2 ||
		{ apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
}

# Kernel ABI (e.g. 6.1.0-56-amd64) the linux-image-amd64 metapackage points
# at; METALD_GUEST_KERNEL_ABI pins it. apt-cache takes ~0.6 s, so the answer
# is cached in OUT_DIR/.kernel-abi, keyed on the apt package lists' mtimes.
lists_sig() { stat -c '%n %Y %s' /var/lib/apt/lists/*_Packages* 2>/dev/null | sha256sum | cut -c1-16; }
kernel_abi() {
	local dep sig cached=""
	if [[ -n ${METALD_GUEST_KERNEL_ABI:-} ]]; then echo "$METALD_GUEST_KERNEL_ABI"; return; fi
	sig=$(lists_sig)
	[[ -r $OUT/.kernel-abi ]] && cached=$(cat "$OUT/.kernel-abi")
	if [[ $cached == "$sig "* ]]; then echo "${cached#* }"; return; fi
	resolve() {
		apt-cache depends linux-image-amd64 2>/dev/null |
			sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -n1
	}
	dep=$(resolve)
	[[ -n $dep ]] || { apt-get update -q >&2 && dep=$(resolve); }
	[[ -n $dep ]] || die "cannot resolve linux-image-amd64's kernel version"
	echo "$(lists_sig) $dep" >"$OUT/.kernel-abi"
	echo "$dep"
}

# Kernel arguments for the test guest. Under TCG the guest's TSC runs at the
# host's TSC rate, and Linux calibrates it against the emulated PIT; on a
# loaded host that calibration fails, the TSC is declared unstable and early
# boot stalls with no working clock. Telling the kernel the rate
# (tsc_early_khz) skips the calibration. Computed on every run: it belongs to
# the host, not to the cached assets.
kernel_args() {
	local khz
	khz=$(awk -F': *' '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo 2>/dev/null || true)
	if [[ ${khz:-0} -gt 0 ]]; then
		echo "console=ttyS0 reboot=k panic=1 tsc_early_khz=$khz"
	else
		echo "console=ttyS0 reboot=k panic=1"
	fi
}

write_env() {
	cat >"$OUT/assets.env.tmp" <<-EOF
		METALD_GUEST_KERNEL=$OUT/vmlinux
		METALD_GUEST_BZIMAGE=$OUT/bzImage
		METALD_GUEST_INITRD=$OUT/initramfs.cpio.gz
		METALD_GUEST_DISK=$OUT/disk.ext4
		METALD_GUEST_KERNEL_VERSION=$KVER
		METALD_GUEST_KERNEL_ARGS="$(kernel_args)"
	EOF
	mv -f "$OUT/assets.env.tmp" "$OUT/assets.env"
	cat "$OUT/assets.env"
}

# Uncompressed ELF vmlinux from a bzImage, like the kernel's
# scripts/extract-vmlinux: try every xz magic (FD 37 7A 58 5A 00) offset.
extract_vmlinux() { # bzImage out
	local off
	while read -r off; do
		# xz exits non-zero on the trailing non-xz bytes; judge by the output.
		tail -c +"$((off + 1))" "$1" | xz -dcq >"$2" 2>/dev/null || true
		[[ $(head -c4 "$2" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] && return 0
	done < <(grep -obUaP '\xFD7zXZ\x00' "$1" | cut -d: -f1)
	die "no xz-compressed ELF found in $1"
}

build() {
	local tmp=$1 root="$1/root" kdir deb m p
	# busybox-static replaces (conflicts with) the dynamic "busybox" package.
	ensure busybox-static cpio e2fsprogs xz-utils

	log "downloading linux-image-$KVER"
	(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$KVER" >&2)
	deb=$(echo "$tmp"/linux-image-"$KVER"_*.deb)
	dpkg -x "$deb" "$tmp/pkg"
	kdir=$tmp/pkg/lib/modules/$KVER
	cp "$tmp/pkg/boot/vmlinuz-$KVER" "$tmp/bzImage"
	extract_vmlinux "$tmp/bzImage" "$tmp/vmlinux"

	# The package ships no modules.dep (postinst runs depmod); make one.
	[[ -f $kdir/modules.dep ]] || busybox depmod -b "$tmp/pkg" "$KVER"
	declare -A dep=() path=() seen=()
	local line name order=()
	while IFS= read -r line; do
		p=${line%%:*} name=${line%%:*}
		name=${name##*/} name=${name%%.ko*}
		dep[$p]=${line#*:} path[${name//-/_}]=$p
	done <"$kdir/modules.dep"
	add_mod() { # depth-first: dependencies before the module itself
		local d
		[[ -n ${seen[$1]:-} ]] && return 0
		seen[$1]=1
		for d in ${dep[$1]}; do add_mod "$d"; done
		order+=("$1")
	}
	for m in "${MODULES[@]}"; do
		if [[ -n ${path[$m]:-} ]]; then add_mod "${path[$m]}"
		elif grep -q "/${m//_/[-_]}\.ko" "$kdir/modules.builtin"; then log "$m: built in"
		else log "warning: module $m not found"; fi
	done

	# initramfs tree: busybox + applet symlinks, /init, modules, acpid handler.
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,tmp,run,etc/acpi/PWRF,lib/modules}
	cp "$(command -v busybox)" "$root/bin/busybox"
	for p in $(busybox --list-full); do
		[[ -e $root/$p ]] || ln -s /bin/busybox "$root/$p"
	done
	install -m 0755 "$GUEST_SRC/init" "$root/init"
	printf '#!/bin/sh\nkill -USR2 1\n' >"$root/etc/acpi/PWRF/00000080"
	chmod 0755 "$root/etc/acpi/PWRF/00000080"
	: >"$root/lib/modules/load.order"
	for p in "${order[@]}"; do
		name=${p##*/} name=${name%%.ko*}
		case $p in # busybox insmod needs plain .ko
		*.ko.xz) xz -dc "$kdir/$p" >"$root/lib/modules/$name.ko" ;;
		*.ko.gz) gzip -dc "$kdir/$p" >"$root/lib/modules/$name.ko" ;;
		*.ko) cp "$kdir/$p" "$root/lib/modules/$name.ko" ;;
		*) die "unsupported module compression: $p" ;;
		esac
		echo "$name" >>"$root/lib/modules/load.order"
	done
	log "modules: $(tr '\n' ' ' <"$root/lib/modules/load.order")"
	mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
	(cd "$root" && find . -print0 | sort -z |
		cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n >"$tmp/initramfs.cpio.gz"

	mkdir -p "$tmp/disk"
	echo "metald test disk" >"$tmp/disk/metald-disk.txt"
	mkfs.ext4 -q -F -L metald-test -d "$tmp/disk" "$tmp/disk.ext4" 16M >&2
}

# ---------------------------------------------------------------------------
KVER=$(kernel_abi)
HASH=$(cat "$SCRIPT" "$GUEST_SRC"/* | sha256sum | cut -c1-16)
STAMP="$KVER $HASH"
ASSETS=(vmlinux bzImage initramfs.cpio.gz disk.ext4)
fresh=1
for a in "${ASSETS[@]}"; do [[ -s $OUT/$a ]] || fresh=0; done
[[ $fresh == 1 && $(cat "$OUT/.stamp" 2>/dev/null) == "$STAMP" ]] || fresh=0

if [[ $fresh == 0 ]]; then
	# Build in a temp dir on the same filesystem, then rename into place; the
	# stamp is written last, so an interrupted run is never taken as complete.
	TMP=$(mktemp -d "$OUT/.build.XXXXXX")
	trap 'rm -rf "$TMP"' EXIT
	rm -f "$OUT/.stamp"
	build "$TMP"
	for a in "${ASSETS[@]}"; do mv -f "$TMP/$a" "$OUT/$a"; done
	echo "$STAMP" >"$OUT/.stamp.tmp" && mv -f "$OUT/.stamp.tmp" "$OUT/.stamp"
	log "built guest assets for $KVER in $OUT"
fi
write_env

((SELFTEST)) || exit 0
# ---------------------------------------------------------------------------
# Self-test: boot under QEMU TCG (nested KVM here is slower than TCG).
ensure qemu-system-x86
command -v python3 >/dev/null || ensure python3
ST=$(mktemp -d /tmp/metald-selftest.XXXXXX)
trap 'rm -rf "$ST" ${TMP:+"$TMP"}' EXIT
boot() { # boot NAME KERNEL: wait for READY, then system_powerdown over QMP
	local name=$1 kernel=$2 log="$ST/$1.log" sock="$ST/$1.qmp" pid t0 t1 t
	t0=$EPOCHREALTIME
	: >"$log"
	qemu-system-x86_64 -M microvm -accel tcg -m 256 -smp 1 -nodefaults \
		-no-user-config -nographic -serial stdio -kernel "$kernel" \
		-initrd "$OUT/initramfs.cpio.gz" -append "$(kernel_args) quiet" \
		-drive "id=d0,file=$OUT/disk.ext4,format=raw,if=none,readonly=on" \
		-device virtio-blk-device,drive=d0 \
		-qmp "unix:$sock,server=on,wait=off" </dev/null >"$log" 2>&1 &
	pid=$!
	for ((i = 0; i < 600; i++)); do
		grep -q METALD-GUEST-READY "$log" && break
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if ! grep -q METALD-GUEST-READY "$log"; then
		kill "$pid" 2>/dev/null || true
		cat "$log" >&2
		die "$name: no METALD-GUEST-READY within 60 s"
	fi
	t=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }")
	log "$name: $(grep -a METALD-GUEST-READY "$log" | tr -d '\r') after ${t}s"
	log "$name: $(grep -a METALD-DISK "$log" | tr -d '\r' || echo 'no METALD-DISK line')"
	t1=$EPOCHREALTIME
	python3 - "$sock" <<-'EOF'
		import json, socket, sys
		s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
		f.readline()  # greeting
		for cmd in ("qmp_capabilities", "system_powerdown"):
		    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
		    while "return" not in (r := json.loads(f.readline())):
		        pass
	EOF
	for ((i = 0; i < 200; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		kill "$pid"; cat "$log" >&2
		die "$name: QEMU still running 20 s after system_powerdown"
	fi
	wait "$pid" || true
	log "$name: $(grep -a METALD-GUEST-SHUTDOWN "$log" | tr -d '\r')"
	log "$name: system_powerdown -> QEMU exited after $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t1 }")s"
}
boot vmlinux "$OUT/vmlinux"
boot bzImage "$OUT/bzImage"
log "selftest OK"
