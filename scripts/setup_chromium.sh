#!/usr/bin/env bash
# Install Debian's chromium for the frontend tests (tests/frontend.py launches it through the
# Python playwright package with executable_path=/usr/bin/chromium; `playwright install` is not
# used: its browser download does not work here). Idempotent; needs root (or sudo) when missing.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation
/usr/bin/chromium --version || true
