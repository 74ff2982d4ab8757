#!/usr/bin/env bash
# Debian's Chromium for the reading page's browser test (tests/test_page.py, marker browser), which
# drives it headless through Python playwright (pip, the [dev] extra). playwright's own browser
# download (`playwright install`) is never used: the test launches /usr/bin/chromium.
#
#   scripts/chromium.sh install    install the Debian package `chromium` if /usr/bin/chromium is
#                                  missing (apt-get update first; needs root or password-less sudo)
#   scripts/chromium.sh check      exit 0 if /usr/bin/chromium is there and runs, else 3
#
# Exit codes: 0 ok (also when it was already installed), 1 failure, 2 usage, 3 not installed.
set -euo pipefail

CHROMIUM_BIN=${CHROMIUM_BIN:-/usr/bin/chromium}

log() { echo "chromium.sh: $*" >&2; }

installed() { [[ -x "$CHROMIUM_BIN" ]] && "$CHROMIUM_BIN" --version >/dev/null 2>&1; }

install() {
    if installed; then log "$("$CHROMIUM_BIN" --version 2>/dev/null) is installed"; return 0; fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if sudo -n true 2>/dev/null; then sudo=(sudo -n); else log "installing needs root (or sudo)"; return 1; fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then log "no apt-get: install Chromium by hand"; return 1; fi
    log "installing chromium with apt-get"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
    installed || { log "installed, but $CHROMIUM_BIN is still missing or does not run"; return 1; }
    log "$("$CHROMIUM_BIN" --version 2>/dev/null) is installed"
}

check() {
    if installed; then "$CHROMIUM_BIN" --version 2>/dev/null; return 0; fi
    log "$CHROMIUM_BIN is not installed (scripts/chromium.sh install)"
    return 3
}

case "${1:-}" in
    install) install ;;
    check) check ;;
    *) echo "usage: scripts/chromium.sh install|check" >&2; exit 2 ;;
esac
