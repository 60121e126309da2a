#!/usr/bin/env bash
# Installs what the browser test (tests/test_playground.py) drives: Debian's
# chromium and its chromedriver, and a CJK font so that Chinese text renders.
# Nothing is downloaded at test time. Needs root (CI runs as root); does
# nothing when the packages are already installed.
set -euo pipefail
packages=(chromium chromium-driver fonts-wqy-zenhei)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "browser-setup: run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
started=$(date +%s)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "browser-setup: installed ${missing[*]} in $(( $(date +%s) - started )) s"
