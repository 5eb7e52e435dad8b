#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver from Debian's packages, for the browser test of
# scalpel-web (crates/scalpel-web/tests/browser.rs). Does nothing when /usr/bin/chromium exists,
# so it is safe to run on every CI pass. Needs root (or sudo) and apt-get; exits non-zero with one
# line saying why when it cannot install.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install_chromium: /usr/bin/chromium is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: apt-get not found; install Debian's chromium package by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_chromium: not root and no password-less sudo; cannot apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
if [ ! -x /usr/bin/chromium ]; then
    echo "install_chromium: apt-get finished but /usr/bin/chromium is missing" >&2
    exit 1
fi
/usr/bin/chromium --version
