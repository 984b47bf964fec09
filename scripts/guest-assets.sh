#!/usr/bin/env bash
# Build a bootable metald test guest from Debian packages only (cached).
#
#   scripts/guest-assets.sh [OUT_DIR]             build (or reuse) the assets
#   scripts/guest-assets.sh --selftest [OUT_DIR]  build, then boot under QEMU/TCG
#
# OUT_DIR defaults to $METALD_ASSETS_DIR, else <repo root>/.metald/assets.
# The kernel .deb is kept in OUT_DIR/.cache. Produces
#   vmlinux             uncompressed ELF kernel (PVH capable; Firecracker needs it)
#   bzImage             the same kernel as shipped by Debian
#   initramfs.cpio.gz   static busybox + scripts/guest/init + virtio/ext4 modules
#   disk.ext4           16 MiB ext4, label "metald-test", /metald-disk.txt
#                       containing "hello-from-disk"
#   assets.env          METALD_GUEST_* lines to `source`
# The kernel is the current bookworm linux-image-<abi>-amd64; the guest loads
# the Debian modules it needs (virtio_mmio, virtio_blk, ext4, button, ...) itself.
# Reruns are a no-op (<1 s) while the kernel version and the hash of this script
# and scripts/guest/* are unchanged (recorded in OUT_DIR/.stamp).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
GUEST_SRC=$(dirname "$SCRIPT")/guest
REPO=$(dirname "$(dirname "$SCRIPT")")
SELFTEST=0
if [[ ${1:-} == --selftest ]]; then SELFTEST=1; shift; fi
[[ ${1:-} == -* ]] && { sed -n '2,/^set -e/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
OUT=${1:-${METALD_ASSETS_DIR:-$REPO/.metald/assets}}
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

# Through a temporary file of this run's own: two runs at once (the demo
# tests run in parallel) must not move each other's file away.
write_env() {
	cat >"$OUT/assets.env.tmp.$$" <<-EOF
		METALD_GUEST_KERNEL=$OUT/vmlinux
		METALD_GUEST_BZIMAGE=$OUT/bzImage
		METALD_GUEST_INITRD=$OUT/initramfs.cpio.gz
		METALD_GUEST_DISK=$OUT/disk.ext4
		METALD_GUEST_KERNEL_VERSION=$KVER
		METALD_GUEST_KERNEL_ARGS="$(kernel_args)"
	EOF
	mv -f "$OUT/assets.env.tmp.$$" "$OUT/assets.env"
	cat "$OUT/assets.env"
}

# Uncompressed ELF vmlinux from a bzImage. The boot protocol header says
# where the compressed payload is: setup_sects at 0x1f1 (0 means 4),
# payload_offset (u32 at 0x248, relative to the protected-mode code at
# (setup_sects + 1) * 512) and payload_length (u32 at 0x24c). Its first bytes
# tell the compressor. Fallback, like the kernel's scripts/extract-vmlinux:
# try every offset of every known magic. The result must be an ELF.
le32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; } # le32 file offset
is_elf() { [[ $(head -c4 "$1" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; }
decompress() { # decompress FORMAT < compressed > raw (trailing junk is fine)
	case $1 in
	xz) xz -dcq ;;
	zstd) zstd -dcq ;;
	gzip) gzip -dcq ;;
	bzip2) bzip2 -dcq ;;
	lzma) xz -dcq --format=lzma ;;
	lz4) lz4 -dcq ;;
	esac
}
MAGICS=("xz \xFD7zXZ\x00" "zstd \x28\xB5\x2F\xFD" "gzip \x1F\x8B\x08"
	"bzip2 BZh" "lzma \x5D\x00\x00\x00" "lz4 \x02\x21\x4C\x18")
extract_vmlinux() { # bzImage out
	local img=$1 out=$2 sects off len fmt m hex
	[[ $(head -c $((0x206)) "$img" 2>/dev/null | tail -c4) == HdrS ]] ||
		die "$img is not a bzImage (no HdrS boot header)"
	sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$img" | tr -d ' ')
	((sects)) || sects=4
	off=$(((sects + 1) * 512 + $(le32 "$img" $((0x248)))))
	len=$(le32 "$img" $((0x24c)))
	hex=$(od -An -tx1 -j "$off" -N4 "$img" | tr -d ' ')
	case $hex in
	fd377a58) fmt=xz ;; 28b52ffd) fmt=zstd ;; 1f8b08*) fmt=gzip ;;
	425a68*) fmt=bzip2 ;; 5d000000) fmt=lzma ;; 02214c18) fmt=lz4 ;;
	*) fmt="" ;;
	esac
	if [[ -n $fmt ]]; then
		log "vmlinux: $fmt payload at offset $off, $len bytes"
		command -v "${fmt/lzma/xz}" >/dev/null || ensure "$(pkg_of "$fmt")"
		tail -c +"$((off + 1))" "$img" | head -c "$len" | decompress "$fmt" >"$out" 2>/dev/null || true
		is_elf "$out" && return 0
		log "header-located payload did not decompress to an ELF; scanning"
	fi
	for m in "${MAGICS[@]}"; do
		fmt=${m%% *}
		command -v "${fmt/lzma/xz}" >/dev/null || continue
		while read -r off; do
			# The decompressor fails on the bytes after the stream; judge by the output.
			tail -c +"$((off + 1))" "$img" | decompress "$fmt" >"$out" 2>/dev/null || true
			is_elf "$out" && { log "vmlinux: $fmt stream found at offset $off"; return 0; }
		done < <(grep -obUaP "${m#* }" "$img" | cut -d: -f1)
	done
	die "no compressed ELF kernel found in $img"
}
pkg_of() { case $1 in xz | lzma) echo xz-utils ;; *) echo "$1" ;; esac; }

build() {
	local tmp=$1 root="$1/root" kdir deb m p
	# busybox-static replaces (conflicts with) the dynamic "busybox" package.
	ensure busybox-static cpio e2fsprogs xz-utils

	# The .deb is kept in OUT_DIR/.cache (only the current version), so a
	# rebuild after editing this script or the init needs no network.
	local cache=$OUT/.cache
	mkdir -p "$cache"
	deb=$(find "$cache" -maxdepth 1 -name "linux-image-${KVER}_*.deb" | sort | tail -n1)
	if [[ -z $deb ]] || ! dpkg-deb --info "$deb" >/dev/null 2>&1; then
		log "downloading linux-image-$KVER"
		rm -f "$cache"/*.deb
		(cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$KVER" >&2) ||
			{ apt-get update -q >&2 &&
				(cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$KVER" >&2); } ||
			die "apt-get download linux-image-$KVER failed"
		deb=$(find "$cache" -maxdepth 1 -name "linux-image-${KVER}_*.deb" | sort | tail -n1)
		[[ -n $deb ]] || die "apt-get download left no linux-image-${KVER}_*.deb in $cache"
	else
		log "using cached $(basename "$deb")"
	fi
	dpkg-deb -x "$deb" "$tmp/pkg"
	[[ -f $tmp/pkg/boot/vmlinuz-$KVER ]] || die "$deb has no /boot/vmlinuz-$KVER"
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
	install -D -m 0755 "$GUEST_SRC/udhcpc.script" "$root/etc/udhcpc.script"
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
	echo "hello-from-disk" >"$tmp/disk/metald-disk.txt"
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
	echo "$STAMP" >"$OUT/.stamp.tmp.$$" && mv -f "$OUT/.stamp.tmp.$$" "$OUT/.stamp"
	log "built guest assets for $KVER in $OUT"
fi
write_env

((SELFTEST)) || exit 0
# ---------------------------------------------------------------------------
# Self-test: boot both kernel formats under QEMU TCG (-M microvm, virtio-mmio
# disk, QMP); wait for READY and the disk line, then system_powerdown (ACPI
# GED power button) and require QEMU to exit. Prints PASS/FAIL per format.
ensure qemu-system-x86
command -v python3 >/dev/null || ensure python3
ST=$(mktemp -d /tmp/metald-selftest.XXXXXX)
trap 'rm -rf "$ST" ${TMP:+"$TMP"}' EXIT
ARGS="$(kernel_args) quiet"
log "kernel command line: $ARGS"
secs() { awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $1 }"; }
qmp() { # qmp SOCKET COMMAND
	python3 - "$@" <<-'EOF'
		import json, socket, sys
		s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
		f = s.makefile("rw")
		f.readline()  # greeting
		for cmd in ("qmp_capabilities", sys.argv[2]):
		    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
		    while True:
		        r = json.loads(f.readline())
		        if "error" in r: sys.exit(f"QMP {cmd}: {r['error']}")
		        if "return" in r: break
	EOF
}
boot() { # boot NAME KERNEL -> 0 on PASS
	local name=$1 kernel=$2 log="$ST/$1.log" sock="$ST/$1.qmp" pid t0 t1 i ok=0
	t0=$EPOCHREALTIME
	: >"$log"
	qemu-system-x86_64 -M microvm -accel tcg -m 256 -smp 1 -nodefaults \
		-no-user-config -nographic -serial stdio -no-reboot -kernel "$kernel" \
		-initrd "$OUT/initramfs.cpio.gz" -append "$ARGS" \
		-drive "id=d0,file=$OUT/disk.ext4,format=raw,if=none,readonly=on" \
		-device virtio-blk-device,drive=d0 \
		-qmp "unix:$sock,server=on,wait=off" </dev/null >"$log" 2>&1 &
	pid=$!
	for ((i = 0; i < 1200; i++)); do # 120 s
		grep -qa METALD-GUEST-READY "$log" && break
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if grep -qa METALD-GUEST-READY "$log"; then
		log "$name: $(grep -a METALD-GUEST-READY "$log" | tr -d '\r') after $(secs "$t0")s"
		if tr -d '\r' <"$log" | grep -qx 'METALD-DISK hello-from-disk'; then
			log "$name: $(grep -a '^METALD-DISK' "$log" | tr -d '\r')"
			ok=1
		else
			log "$name: FAIL: no 'METALD-DISK hello-from-disk' line"
		fi
		t1=$EPOCHREALTIME
		qmp "$sock" system_powerdown >&2 || ok=0
		for ((i = 0; i < 300; i++)); do # 30 s
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "$name: FAIL: QEMU still running 30 s after system_powerdown"
			ok=0
		else
			log "$name: $(grep -a METALD-GUEST-SHUTDOWN "$log" | tr -d '\r')"
			log "$name: system_powerdown -> QEMU exited after $(secs "$t1")s"
		fi
	else
		log "$name: FAIL: no METALD-GUEST-READY within 120 s (QEMU $(kill -0 "$pid" 2>/dev/null && echo running || echo exited))"
	fi
	if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
	wait "$pid" 2>/dev/null || true
	if ((ok)); then
		echo "PASS $name: -M microvm -kernel $(basename "$kernel") (total $(secs "$t0")s)"
		return 0
	fi
	log "$name: serial log:"
	tail -n 40 "$log" | sed 's/^/    /' >&2
	echo "FAIL $name: -M microvm -kernel $(basename "$kernel")"
	return 1
}
rc=0
boot vmlinux "$OUT/vmlinux" || rc=1
boot bzImage "$OUT/bzImage" || rc=1
((rc == 0)) && echo "selftest PASS" || echo "selftest FAIL"
exit "$rc"
