#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# The deployment test inside a booted Debian container (see run.sh): run by the oneshot unit
# deploy-test.service as root, with the test's files in /ci (README.md, the two packages in
# /ci/debs/old and /ci/debs/new, upstream.yaml, tiles.py). It follows README's "Production on
# Debian 12 or 13" section by running its fenced blocks marked `deploy-test: NAME`, then
# checks. It writes its log to /ci/log and PASS or "FAIL: reason" to /ci/result; the unit
# powers the container off when it ends. Every wait is bounded.
set -uo pipefail
exec >/ci/log 2>&1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
cd /ci

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%T)"; }
dump() {
	echo "--- journal of the units"
	journalctl --no-pager -o short-precise -u mapproxy-renderd.service -u mapproxy-renderd.socket \
		-u apache2.service -u upstream-wms.service -u deploy-test.service | tail -n 300
	echo "--- /var/log/apache2/error.log"
	tail -n 50 /var/log/apache2/error.log 2>/dev/null
	echo "--- processes"
	ps -eo user,pid,ppid,lstart,args | grep -v ' \[' | tail -n 60
}
fail() {
	echo "FAIL: $*"
	dump
	echo "FAIL: $*" >/ci/result
	exit 1
}
# wait_for SECONDS WHAT CMD…: poll CMD every half second until it succeeds.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $end ] || fail "timeout after ${secs}s: $what"
		sleep 0.5
	done
}
# block NAME: README's fenced block after <!-- deploy-test: NAME -->, run as written.
block() {
	awk -v name="$1" '
		$0 == "<!-- deploy-test: " name " -->" { armed = 1; next }
		armed && /^```/ { if (inside) exit; inside = 1; next }
		inside { print }' README.md >"/ci/block-$1.sh"
	[ -s "/ci/block-$1.sh" ] || fail "README has no block deploy-test: $1"
	step "README block $1"
	cat "/ci/block-$1.sh"
	(cd "$2" && timeout 600 bash -euxo pipefail "/ci/block-$1.sh") || fail "README block $1 failed"
}
pids_of_daemon_user() { pgrep -u mapproxy-renderd | sort; }
main_pid() { systemctl show -P MainPID mapproxy-renderd.service; }
tms() { echo "http://127.0.0.1/mapproxy/tms/1.0.0/osm/GLOBAL_WEBMERCATOR/$1.png"; }
# get_tile Z/X/Y: through Apache; must be 200 image/png with PNG bytes.
get_tile() {
	local got
	got=$(curl -sS --max-time 120 -o /tmp/tile.png -w '%{http_code} %{content_type}' "$(tms "$1")") ||
		fail "GET $1: curl failed"
	[ "$got" = "200 image/png" ] || { head -c 600 /tmp/tile.png; echo; fail "GET $1: got $got, want 200 image/png"; }
	[ "$(head -c 4 /tmp/tile.png | od -An -c | tr -d ' ')" = "211PNG" ] || fail "GET $1: not a PNG"
}
missing() { /usr/bin/python3 /ci/tiles.py missing "$1"; }
none_missing() { [ "$(missing "$1")" = 0 ]; }
task_done() { /usr/bin/python3 /ci/tiles.py task "$1" | grep -q '^done '; }

step "versions"
{
	echo "debian $(cat /etc/debian_version)"
	echo "mapproxy $(/usr/bin/python3 -c 'import mapproxy.version as v; print(v.version)')"
	echo "python $(/usr/bin/python3 -c 'import platform; print(platform.python_version())')"
	echo "haproxy $(haproxy -v | head -n 1)"
	echo "systemd $(systemctl --version | head -n 1)"
	echo "apache2 $(dpkg-query -W -f='${Version}' apache2) mod_wsgi $(dpkg-query -W -f='${Version}' libapache2-mod-wsgi-py3)"
} | tee /ci/versions

step "upstream WMS (the test's data source, 127.0.0.1:8112)"
systemd-run --quiet --unit=upstream-wms -p Type=exec /usr/bin/mapproxy-util serve-develop -b 127.0.0.1:8112 /ci/upstream.yaml ||
	fail "cannot start the upstream WMS"
wait_for 60 "upstream WMS answers" curl -sf -o /dev/null 'http://127.0.0.1:8112/service?SERVICE=WMS&REQUEST=GetCapabilities'

block install /ci/debs/old
step "a first install enables and starts nothing"
for u in mapproxy-renderd.socket mapproxy-renderd.service; do
	state=$(systemctl is-enabled "$u" 2>&1)
	[ "$state" = disabled ] || fail "after the first install $u is $state, want disabled"
	systemctl -q is-active "$u" && fail "after the first install $u is active"
done
[ -z "$(pids_of_daemon_user)" ] || fail "processes of mapproxy-renderd after the first install"

block configure /ci
block apache /ci
block enable /ci
wait_for 60 "mapproxy-renderd.service active" systemctl -q is-active mapproxy-renderd.service

step "the first request is a live one through Apache"
[ -e /var/cache/mapproxy/tile_locks ] && fail "tile_locks exists before the first request"
ls -la /var/cache/mapproxy
get_tile 2/1/1
ls -la /var/cache/mapproxy /var/cache/mapproxy/tile_locks
owner=$(stat -c '%U %A' /var/cache/mapproxy/tile_locks)
echo "tile_locks: $owner (made by MapProxy under Apache)"
[ "${owner%% *}" = www-data ] || fail "tile_locks owned by $owner: the first request did not come from Apache"
[ -n "$(find /var/cache/mapproxy -name '*.png' -user mapproxy-renderd -print -quit)" ] ||
	fail "no tile written by mapproxy-renderd's renderers"
get_tile 3/5/2

step "seed --wait as a member of group mapproxy"
timeout 600 runuser -u tiles -- mapproxy-renderd seed --wait initial </dev/null || fail "seed --wait initial as tiles failed"
task_done seed || fail "the seed task is not done: $(/usr/bin/python3 /ci/tiles.py task seed)"

step "an expiry list through the expire_dir spool"
spool=/var/spool/mapproxy-renderd/expire/osm_cache_GLOBAL_WEBMERCATOR
runuser -u tiles -- sh -c "echo 6/33/22 >$spool/.list.tmp && mv $spool/.list.tmp $spool/update-1.list" || fail "cannot write the expiry list as tiles"
wait_for 120 "the expire task is done" task_done expire
[ -e "$spool/update-1.list" ] && fail "the expiry list is still in the spool"
/usr/bin/python3 /ci/tiles.py task expire

step "systemctl kill -s KILL during 5,000 accepted background jobs"
old_main=$(main_pid)
old_pids=$(pids_of_daemon_user)
declare -A old_start
for p in $old_pids; do old_start[$p]=$(awk '{print $22}' "/proc/$p/stat"); done
echo "old MainPID $old_main, processes: $(echo $old_pids)"
timeout 300 /usr/bin/python3 /ci/tiles.py background 5000 7 /ci/bg.json || fail "not every background request was accepted"
systemctl kill -s KILL mapproxy-renderd.service || fail "systemctl kill failed"
before=$(missing /ci/bg.json)
echo "tiles not yet rendered at the kill: $before of 5000"
[ "$before" -gt 0 ] || fail "every job had finished before the kill: the kill proves nothing"
restarted() {
	local pid
	pid=$(main_pid)
	[ "$pid" != 0 ] && [ "$pid" != "$old_main" ] && systemctl -q is-active mapproxy-renderd.service
}
wait_for 120 "mapproxy-renderd restarted" restarted
echo "new MainPID $(main_pid), NRestarts $(systemctl show -P NRestarts mapproxy-renderd.service)"
for p in $old_pids; do
	# the same pid with the same start time (field 22 of /proc/PID/stat) is the same process
	if [ "$(awk '{print $22}' "/proc/$p/stat" 2>/dev/null)" = "${old_start[$p]}" ]; then
		fail "process $p of the old instance still runs: $(tr '\0' ' ' <"/proc/$p/cmdline")"
	fi
done
wait_for 900 "all 5,000 background tiles rendered after the restart" none_missing /ci/bg.json
echo "all 5000 tiles are in the cache"

step "systemctl reload"
pid=$(main_pid)
systemctl reload mapproxy-renderd.service || fail "reload failed"
[ "$(main_pid)" = "$pid" ] || fail "reload changed the MainPID"
wait_for 60 "active after reload" systemctl -q is-active mapproxy-renderd.service
get_tile 4/3/7

step "upgrade to a newer build"
old_version=$(dpkg-query -W -f='${Version}' mapproxy-renderd)
sock_inode=$(stat -c %i /run/mapproxy-renderd.sock)
sock_since=$(systemctl show -P ActiveEnterTimestampMonotonic mapproxy-renderd.socket)
pid=$(main_pid)
timeout 300 /usr/bin/python3 /ci/tiles.py background 300 10 /ci/bg-upgrade.json || fail "background requests before the upgrade"
(cd /ci/debs/new && timeout 600 apt-get install -y ./mapproxy-renderd_*.deb) || fail "the upgrade failed"
new_version=$(dpkg-query -W -f='${Version}' mapproxy-renderd)
echo "upgraded $old_version -> $new_version; $(mapproxy-renderd version)"
[ "$new_version" != "$old_version" ] || fail "the version did not change"
for u in mapproxy-renderd.socket mapproxy-renderd.service; do
	state=$(systemctl is-enabled "$u" 2>&1)
	[ "$state" = enabled ] || fail "after the upgrade $u is $state, want enabled (kept)"
done
[ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart the daemon"
wait_for 60 "active after the upgrade" systemctl -q is-active mapproxy-renderd.service
[ "$(stat -c %i /run/mapproxy-renderd.sock)" = "$sock_inode" ] || fail "the upgrade replaced the socket (listeners not kept)"
[ "$(systemctl show -P ActiveEnterTimestampMonotonic mapproxy-renderd.socket)" = "$sock_since" ] || fail "the upgrade restarted the socket unit"
wait_for 600 "background jobs queued before the upgrade rendered (journal kept)" none_missing /ci/bg-upgrade.json
get_tile 5/9/9

step "systemctl stop leaves no process"
systemctl stop mapproxy-renderd.socket mapproxy-renderd.service || fail "stop failed"
wait_for 30 "no process of mapproxy-renderd" test -z "$(pids_of_daemon_user)"
[ -e /run/mapproxy-renderd.sock ] && fail "the socket file is left after stop"

step "purge"
find /etc /usr /lib /var/lib /var/cache /var/spool -xdev 2>/dev/null | grep -v -e '^/var/lib/dpkg' -e '^/var/lib/apt' \
	-e '^/var/cache/apt' -e '^/var/cache/debconf' -e '^/var/lib/systemd/' -e '^/var/cache/mapproxy/' -e '^/var/cache/man' | sort >/tmp/before
timeout 300 apt-get purge -y mapproxy-renderd || fail "purge failed"
find /etc /usr /lib /var/lib /var/cache /var/spool -xdev 2>/dev/null | grep -v -e '^/var/lib/dpkg' -e '^/var/lib/apt' \
	-e '^/var/cache/apt' -e '^/var/cache/debconf' -e '^/var/lib/systemd/' -e '^/var/cache/mapproxy/' -e '^/var/cache/man' | sort >/tmp/after
comm -23 /tmp/before /tmp/after >/tmp/removed
echo "removed by purge:"; cat /tmp/removed
unexpected=
while read -r gone; do
	case $gone in
	*mapproxy-renderd*) ;;
	/etc/systemd/system/*.wants)
		# made by enabling our units: held only their links
		grep "^$gone/" /tmp/before | grep -qv mapproxy-renderd && unexpected="$unexpected $gone" ;;
	*) unexpected="$unexpected $gone" ;;
	esac
done </tmp/removed
[ -z "$unexpected" ] || fail "purge removed what the package did not make: $unexpected"
left=$(grep -e '/mapproxy-renderd' /tmp/after | grep -v -e '^/var/spool/mapproxy-renderd' \
	-e '^/etc/systemd/system/mapproxy-renderd.service.d' || true)
[ -z "$left" ] || fail "purge left the package's files: $left"
for keep in /etc/mapproxy/mapproxy.yaml /var/spool/mapproxy-renderd/expire /etc/systemd/system/mapproxy-renderd.service.d/spool.conf; do
	[ -e "$keep" ] || fail "purge removed the admin's $keep"
done
[ -n "$(find /var/cache/mapproxy -name '*.png' -print -quit)" ] || fail "purge removed the tile cache"
ls /var/lib/systemd/deb-systemd-helper-enabled 2>/dev/null | grep mapproxy-renderd && fail "enablement state left after purge"

echo PASS >/ci/result
echo PASS
