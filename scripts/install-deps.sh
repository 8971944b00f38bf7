#!/usr/bin/env bash
# `make deps`: installs the system packages the full test suite uses, where they are missing (needs root
# and apt): docker-compose 1.29 validates docker-compose.yml without an engine; Chromium renders the report
# page headless. `make test-fast` needs neither.
set -euo pipefail

# install COMMAND PACKAGE WHY: apt-get installs PACKAGE unless COMMAND is already on the PATH.
install() {
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $2 ($3)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "$1 is missing: install Debian's $2 package as root ($3)" >&2
    exit 1
  fi
}

install docker-compose docker-compose "the deploy-file test validates docker-compose.yml with it"
install chromium chromium "the report test renders the report page in headless Chromium"
install npm npm "the browser UI test fetches axe-core (the accessibility checker) with npm pack"
