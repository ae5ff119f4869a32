#!/usr/bin/env bash
# Installs the headless browser the web-UI test drives (tests/test_web_ui.py): Debian's chromium and
# chromium-driver. Run by that test only, so `make run` and the rest of `make test` never need it.
# Prints what it did; exits non-zero, saying why, where it cannot install them (not root, no apt-get,
# no package index), and the test then skips with that message.
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    echo "install_browser: $CHROMIUM and $CHROMEDRIVER are installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: $CHROMIUM or $CHROMEDRIVER is missing and there is no apt-get to install" \
         "Debian's chromium and chromium-driver" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install_browser: installing chromium and chromium-driver needs root (or passwordless sudo)" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# One install at a time (pytest-xdist workers, other checkouts on the machine); apt waits for its own lock too.
exec 9>"${TMPDIR:-/tmp}/fp8-turbo-install-browser.lock"
flock 9
if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    echo "install_browser: $CHROMIUM and $CHROMEDRIVER are installed"
    exit 0
fi
echo "install_browser: apt-get install chromium chromium-driver"
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver; then
    echo "install_browser: refreshing the package index and trying again"
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
[ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ] || {
    echo "install_browser: apt-get finished but $CHROMIUM or $CHROMEDRIVER is still missing" >&2
    exit 1
}
"$CHROMIUM" --version
