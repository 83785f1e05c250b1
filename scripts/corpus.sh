#!/usr/bin/env bash
# Builds an English corpus of about MB megabytes (default 100) for the wordcount benchmark, from real English
# text in Debian's packages: dict-gcide (the GNU Collaborative International Dictionary of English) and
# dict-devil (Ambrose Bierce's The Devil's Dictionary), concatenated and repeated to size, cut after a
# whole line. Prints the corpus's path (default target/corpus/english-<MB>MB.txt); an existing one is reused.
set -euo pipefail
mb=${1:-100}
cd "$(dirname "$0")/.."
out=${2:-target/corpus/english-${mb}MB.txt}
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download dict-gcide dict-devil >/dev/null 2>&1) || {
    echo "corpus: could not download dict-gcide and dict-devil with apt-get (is a Debian mirror reachable?)" >&2
    exit 1
}
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/x"
done
zcat "$work/x/usr/share/dictd/gcide.dict.dz" "$work/x/usr/share/dictd/devil.dict.dz" >"$work/base.txt"
bytes=$((mb * 1000000))
: >"$work/all.txt"
while [ "$(stat -c %s "$work/all.txt")" -lt "$bytes" ]; do
    cat "$work/base.txt" >>"$work/all.txt"
done
mkdir -p "$(dirname "$out")"
# Whole lines only: drop the line the cut falls in.
head -c "$bytes" "$work/all.txt" | sed '$d' >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
