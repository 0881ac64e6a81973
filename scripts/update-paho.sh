#!/usr/bin/env bash
# Replaces the vendored Eclipse Paho JavaScript client of the dashboard with the minified
# copy of a release from the npm registry, after checking the tarball against the
# registry's sha512 integrity; then record the version and hash in dashboard/dashboard.go.
#
#   scripts/update-paho.sh 1.1.0
set -euo pipefail
version=${1:?usage: scripts/update-paho.sh VERSION (for example 1.1.0)}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
want=$(npm view "paho-mqtt@$version" dist.integrity)
npm pack --silent "paho-mqtt@$version" >/dev/null
got="sha512-$(openssl dgst -sha512 -binary "paho-mqtt-$version.tgz" | base64 -w0)"
if [ "$got" != "$want" ]; then
	echo "paho-mqtt-$version.tgz: integrity $got, the registry says $want; nothing changed" >&2
	exit 1
fi
tar xzf "paho-mqtt-$version.tgz"
static=$root/dashboard/static
cp package/paho-mqtt-min.js "$static/paho-mqtt.min.js"
cp package/epl-v10 "$static/paho-mqtt.LICENSE-EPL"
cp package/edl-v10 "$static/paho-mqtt.LICENSE-EDL"
echo "paho-mqtt $version ($want): dashboard/static/paho-mqtt.min.js"
echo "sha256 of the file: $(sha256sum "$static/paho-mqtt.min.js" | cut -d' ' -f1)"
