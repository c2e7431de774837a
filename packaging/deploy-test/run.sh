#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# The deployment test (README "Production on Debian 12 or 13"), as root:
#
#   packaging/deploy-test/run.sh [SUITE…]        default: bookworm trixie
#   packaging/deploy-test/run.sh --rootfs SUITE   print the cached root file system's path
#
# Builds two packages of this tree with packaging/build-deb.sh (the second with a higher
# version, for the upgrade), then for each suite: a root file system from debootstrap
# (cached in $CACHE/<suite>-<hash of suite, mirror and package list>, built once), booted
# with systemd-nspawn -b on a throw-away overlay, without network (everything is loopback
# inside). The oneshot unit deploy-test.service runs inside.sh, which follows README's
# production section and writes /ci/result; the unit powers the container off when it ends.
# On failure the log (with the units' journal) is printed. Exit 0 when every suite passed.
#
# Environment: DEPLOY_TEST_CACHE (default /var/cache/mapproxy-renderd-ci),
# DEPLOY_TEST_MIRROR (default: the first deb.debian.org-style "debian" URI apt uses),
# DEPLOY_TEST_TIMEOUT (seconds per suite, default 1800), DEPLOY_TEST_KEEP=1 keeps the work dir.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${DEPLOY_TEST_CACHE:-/var/cache/mapproxy-renderd-ci}
timeout_s=${DEPLOY_TEST_TIMEOUT:-1800}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(bookworm trixie)

die() { echo "deploy-test: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn, dpkg)"
for tool in debootstrap systemd-nspawn dpkg-deb flock; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap systemd-container)"
done

# The archive apt already uses: the first URI of a source whose path ends in /debian.
mirror=${DEPLOY_TEST_MIRROR:-}
if [ -z "$mirror" ]; then
	mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
		grep -Eo 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
	mirror=${mirror%/}
	[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi

# What the root file system holds besides minbase: systemd as init, what README's
# production section installs (so no network is needed inside), and the test's tools.
# The package's own dependencies come with python3-mapproxy & co.
packages=systemd,systemd-sysv,dbus,procps,adduser,curl,ca-certificates,apache2,libapache2-mod-wsgi-py3,python3-mapproxy,mapproxy,python3-requests,python3-requests-unixsocket,python3-shapely,haproxy

work=$(mktemp -d /var/tmp/mapproxy-renderd-deploy.XXXXXX)
mounted_nspawn=
cleanup() {
	[ -n "$mounted_nspawn" ] && umount /run/systemd/nspawn 2>/dev/null
	[ "${DEPLOY_TEST_KEEP:-}" = 1 ] && echo "deploy-test: kept $work" || rm -rf "$work"
}
trap cleanup EXIT

# rootfs SUITE: the cached root file system's path (built under a lock, renamed into place
# only when complete).
rootfs() {
	local suite=$1 key dir
	key=$(printf '%s\n' "$suite" "$mirror" "$packages" minbase | sha256sum | cut -c1-12)
	dir=$cache/$suite-$key
	mkdir -p "$cache"
	(
		flock 9
		if [ ! -e "$dir/etc/debian_version" ]; then
			rm -rf "$dir.tmp"
			echo "deploy-test: debootstrap $suite from $mirror into $dir" >&2
			local t0=$SECONDS
			timeout 1800 debootstrap --variant=minbase --include="$packages" "$suite" "$dir.tmp" "$mirror" >"$work/debootstrap-$suite.log" 2>&1 ||
				{ tail -n 30 "$work/debootstrap-$suite.log" >&2; exit 1; }
			chroot "$dir.tmp" apt-get clean
			mv "$dir.tmp" "$dir"
			echo "deploy-test: debootstrap $suite took $((SECONDS - t0))s" >&2
		fi
	) 9>"$cache/.lock" || die "debootstrap $suite failed"
	echo "$dir"
}

# --rootfs SUITE: only print the cached root file system's path (built when missing), e.g.
# for the cluster test with trixie's HAProxy (packaging/deploy-test/haproxy-from-root).
if [ "${suites[0]}" = --rootfs ]; then
	[ ${#suites[@]} = 2 ] || die "usage: run.sh --rootfs SUITE"
	rootfs "${suites[1]}"
	exit 0
fi

# Two builds of this tree: "old" and a newer "new" for the upgrade.
mkdir -p "$work/debs/old" "$work/debs/new"
"$repo/packaging/build-deb.sh" "$work/debs/old" | tail -n 2
VERSION_SUFFIX=+deploytest2 "$repo/packaging/build-deb.sh" "$work/debs/new" | tail -n 2

# systemd-nspawn keeps state in /run/systemd/nspawn, which must be a tmpfs.
if ! findmnt -n -t tmpfs /run >/dev/null && ! findmnt -n -t tmpfs /run/systemd/nspawn >/dev/null; then
	mkdir -p /run/systemd/nspawn
	mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
	mounted_nspawn=1
fi

failed=()
for suite in "${suites[@]}"; do
	root=$(rootfs "$suite")
	ci=$work/$suite
	mkdir -p "$ci"
	cp -a "$work/debs" "$ci/"
	cp "$repo/README.md" "$repo/examples/upstream.yaml" "$here/inside.sh" "$here/tiles.py" "$ci/"
	cat >"$work/deploy-test-$suite.service" <<-UNIT
	[Unit]
	Description=mapproxy-renderd deployment test
	After=multi-user.target
	SuccessAction=poweroff-force
	FailureAction=poweroff-force
	[Service]
	Type=oneshot
	ExecStart=/bin/bash /ci/inside.sh
	TimeoutStartSec=$((timeout_s - 60))
	StandardOutput=journal
	UNIT
	echo "deploy-test: booting $suite ($root)"
	t0=$SECONDS
	rc=0
	timeout --kill-after=30 "$timeout_s" systemd-nspawn --quiet --boot --register=no --keep-unit \
		--private-network --volatile=overlay --directory="$root" --machine="mprd-$suite" \
		--bind="$ci:/ci" --bind-ro="$work/deploy-test-$suite.service:/etc/systemd/system/deploy-test.service" \
		systemd.wants=deploy-test.service >"$work/console-$suite.log" 2>&1 || rc=$?
	result=$(cat "$ci/result" 2>/dev/null || echo "FAIL: no result (nspawn exit $rc; see the console)")
	echo "deploy-test: $suite: $result ($((SECONDS - t0))s)"
	[ -f "$ci/versions" ] && sed 's/^/  /' "$ci/versions"
	if [ "$result" != PASS ]; then
		failed+=("$suite")
		echo "----- $suite: log"
		cat "$ci/log" 2>/dev/null || true
		echo "----- $suite: console (last 60 lines)"
		tail -n 60 "$work/console-$suite.log"
	fi
done
[ ${#failed[@]} -eq 0 ] || die "failed on: ${failed[*]}"
echo "deploy-test: PASS on ${suites[*]}"
