#!/usr/bin/env bash
# Debian's Chromium for the status page's end-to-end test (headless, no sandbox as root).
# Usage: scripts/chromium.sh install|path
set -euo pipefail
BIN=/usr/bin/chromium
case "${1:-}" in
  install)
    if [ ! -x "$BIN" ]; then
      if [ "$(id -u)" = 0 ]; then
        echo "chromium: installing Debian's chromium" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
      else
        echo "chromium: $BIN missing and not root: install Debian's chromium" >&2; exit 1
      fi
    fi ;;
  path) echo "$BIN" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
