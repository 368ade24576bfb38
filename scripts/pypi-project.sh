#!/usr/bin/env bash
# Makes a git repository of a real project from PyPI with Reprise's mkfile
# added: six's source distribution, fetched from PyPI and checked against
# the digest pinned here, and examples/pypi-six/mkfile. Nothing else of
# ours goes in.
#
#   scripts/pypi-project.sh DIR      then: cd DIR && reprise run
set -euo pipefail
dest=${1:?usage: scripts/pypi-project.sh DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
name=six
version=1.17.0
sha256=ff70335d468e7eb6ec65b95b99d3a2836546063f63acc5171de367e834932a81
index=${PIP_INDEX_URL:-https://pypi.org/simple}

if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
  echo "pypi-project: $dest exists and is not empty" >&2
  exit 2
fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The package's page in the simple index names the file and its digest.
sdist=$name-$version.tar.gz
url=$(curl -sSfL "$index/$name/" | grep -o "href=\"[^\"]*/$sdist#sha256=$sha256\"" | head -n 1 |
  sed -e 's/^href="//' -e 's/#.*//')
if [ -z "$url" ]; then
  echo "pypi-project: $index/$name/ lists no $sdist with sha256 $sha256" >&2
  exit 3
fi
curl -sSfL -o "$work/$sdist" "$url"
echo "$sha256  $work/$sdist" | sha256sum --check --quiet - || {
  echo "pypi-project: $url does not have the pinned digest" >&2
  exit 3
}
tar -xzf "$work/$sdist" -C "$dest" --strip-components=1
cp "$here/examples/pypi-six/mkfile" "$dest/mkfile"

cd "$dest"
git init -q
git add -A
git -c user.name=reprise -c user.email=reprise@localhost \
  commit -q -m "$name $version from PyPI, with Reprise's mkfile"
echo "pypi-project: $dest holds $name $version from PyPI and the mkfile; run: cd $dest && reprise run"
