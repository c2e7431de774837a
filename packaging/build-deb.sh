#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build the Debian package with dpkg-deb (no debhelper, no network: Go modules come
# from the module cache, as for `go test`):
#
#   packaging/build-deb.sh [OUTDIR]      → OUTDIR/mapproxy-renderd_<version>_<arch>.deb
#
# OUTDIR defaults to the repository root. The last line of output is the path of the .deb.
# The binary's version (what `mapproxy-renderd version` prints) is `git describe --tags
# --always --dirty`; the package version is derived from it: a tag v1.2.0 gives 1.2.0-1,
# 3 commits later 1.2.0+3.gabc1234-1; without a tag 0.0~git<commits>.g<hash>-1 (ordered
# by the number of commits). "+dirty" marks a build from a modified tree.
# Environment: GO (default: go on PATH, else /usr/local/go/bin/go),
# SOURCE_DATE_EPOCH (default: the commit time; file times in the package),
# VERSION_SUFFIX (appended to both versions, e.g. "+local2": a newer build of the same
# commit, as the deployment test's upgrade needs).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
pkgname=mapproxy-renderd

die() { echo "build-deb: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"
[[ -x $GO ]] || die "Go not found (PATH or /usr/local/go/bin/go; set GO=)"
mkdir -p "$out"
out=$(cd "$out" && pwd)

describe=$(git -C "$repo" describe --tags --always --dirty)${VERSION_SUFFIX:-}
commits=$(git -C "$repo" rev-list --count HEAD)
hash=$(git -C "$repo" rev-parse --short HEAD)
upstream=${describe#v}
suffix=${VERSION_SUFFIX:-}
[[ $suffix =~ ^[0-9A-Za-z.+~]*$ ]] || die "VERSION_SUFFIX may hold only 0-9 A-Z a-z . + ~"
upstream=${upstream%"$suffix"}
dirty=
if [[ $upstream == *-dirty ]]; then
	upstream=${upstream%-dirty}
	dirty=+dirty
fi
if [[ $upstream =~ ^[0-9][0-9A-Za-z.+~]*$ && $upstream != "$hash" ]]; then
	: # a tag: v1.2.0 → 1.2.0
elif [[ $upstream =~ ^([0-9][0-9A-Za-z.+~]*)-([0-9]+)-g([0-9a-f]+)$ ]]; then
	upstream="${BASH_REMATCH[1]}+${BASH_REMATCH[2]}.g${BASH_REMATCH[3]}"
else
	upstream="0.0~git$commits.g$hash"
fi
debversion="$upstream$dirty$suffix-1"

case $(dpkg --print-architecture) in
amd64) arch=amd64 goarch=amd64 ;;
arm64) arch=arm64 goarch=arm64 ;;
*) die "unsupported architecture $(dpkg --print-architecture)" ;;
esac

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct)}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
umask 022

# The binary: with cgo, as `go build` builds it (user and group names resolve through NSS,
# so socket_group and the allow-list see LDAP groups too), hardened as Debian builds C
# programs (PIE, full RELRO, BIND_NOW), stripped, reproducible paths. It links libc
# dynamically; Depends names the newest glibc symbol version it uses.
install -d "$root/usr/bin"
(cd "$repo" && CGO_ENABLED=1 GOOS=linux GOARCH=$goarch "$GO" build -trimpath -buildvcs=false -buildmode=pie \
	-ldflags "-s -w -linkmode=external -extldflags=-Wl,-z,relro,-z,now -X main.version=$describe" \
	-o "$root/usr/bin/$pkgname" .) || die "go build failed"
glibc=$(objdump -T "$root/usr/bin/$pkgname" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
libc_dep=libc6${glibc:+ (>= $glibc)}

# systemd units, under the package's name (Debian's renderd package from mod_tile owns
# renderd.service); they refer to each other with %N.
install -D -m 0644 "$repo/renderd.service" "$root/lib/systemd/system/$pkgname.service"
install -D -m 0644 "$repo/renderd.socket" "$root/lib/systemd/system/$pkgname.socket"
install -D -m 0644 "$repo/packaging/renderd.yaml" "$root/etc/$pkgname/renderd.yaml"

install -d "$root/usr/share/man/man8"
gzip -9n <"$repo/packaging/$pkgname.8" >"$root/usr/share/man/man8/$pkgname.8.gz"

doc=$root/usr/share/doc/$pkgname
install -D -m 0644 "$repo/packaging/debian/copyright" "$doc/copyright"
gzip -9n <"$repo/README.md" >"$doc/README.md.gz"
install -d "$doc/examples"
for f in mapproxy.yaml renderd.yaml seed.yaml mapproxy_wsgi.py serve_wsgi.py; do
	install -m 0644 "$repo/examples/$f" "$doc/examples/$f"
done
maintainer=$(git -C "$repo" log -1 --format='%an <%ae>')
{
	printf '%s (%s) unstable; urgency=medium\n\n' "$pkgname" "$debversion"
	printf '  * Built from git %s\n    (commit %s).\n\n' "$describe" "$(git -C "$repo" rev-parse HEAD)"
	printf ' -- %s  %s\n' "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.Debian.gz"

# Control files.
install -d -m 0755 "$root/DEBIAN"
for s in postinst prerm postrm; do
	install -m 0755 "$repo/packaging/debian/$s" "$root/DEBIAN/$s"
done
echo "/etc/$pkgname/renderd.yaml" >"$root/DEBIAN/conffiles"
size=$(du -k -s --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: $pkgname
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $libc_dep, adduser, python3, python3-mapproxy, python3-requests
Recommends: python3-requests-unixsocket, python3-shapely
Suggests: mapproxy, socat
Section: web
Priority: optional
Description: render queue daemon for MapProxy tile caches
 mapproxy-renderd renders map tiles in the background for MapProxy: a
 priority queue in front of long-lived render processes. Unmodified
 MapProxy 1.15 and mapproxy-seed talk to it over their own renderd protocol
 (HTTP); scripts use a native newline-delimited JSON protocol on the same
 Unix socket. Identical requests are rendered once, live requests go before
 seeding, and seeding can be limited to part of the renderers.
 .
 The daemon can also seed and clean up caches itself from MapProxy's
 seed.yaml. It comes with systemd units (socket activation, sd_notify,
 hardening) and a bundled MapProxy renderer run with python3-mapproxy.
EOF
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
find "$root" -type d -exec chmod 0755 {} +
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

deb=$out/${pkgname}_${debversion}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "version $describe (package $debversion)"
echo "$deb"
