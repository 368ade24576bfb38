#!/bin/sh
# Installs Debian's nodejs and npm for bench/src/bin/turbo_bench.rs, which
# installs turbo and turborepo-remote-cache from npm itself. Only the
# benchmark needs them (CI does not run it), so scripts/setup.sh does not
# list them.
set -eu
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
	echo "node $(node --version) and npm $(npm --version) are installed"
	exit 0
fi
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm
echo "node $(node --version) and npm $(npm --version) installed"
