#!/usr/bin/env bash
# Installs the Debian packages the lab needs (chromium: kaleido's static export and the browser
# tests). Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "system_deps: missing ${need[*]} and not root: install them with apt-get (Debian) first" >&2
    exit 1
  fi
fi
echo "system_deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${need[@]}" >/dev/null
