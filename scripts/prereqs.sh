#!/usr/bin/env bash
# What `make test` needs from the system, installed where it is missing (`make prereqs`):
#   redis-server    the tests' own Redis servers
#   chromium        tests/test_studio.py drives Debian's chromium through Playwright
#   node, npm       tests/test_openai.py drives the API with the openai npm package
#   docker-compose  tests/test_deploy.py checks docker-compose.yml with `config -q`
#                   (Debian's 1.29; the `docker compose` plugin does as well)
#   python3-venv    for `make install`, while there is no .venv yet
# As root with apt-get: one `apt-get update`, then one `apt-get install`. Otherwise it
# stops at once and prints the one command that installs them.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
missing=()

have() { command -v "$1" >/dev/null 2>&1; }

have redis-server || missing+=(redis-server)
have chromium || missing+=(chromium)
{ have node && have npm; } || missing+=(nodejs npm)
if ! have docker-compose && ! { have docker && docker compose version >/dev/null 2>&1; }; then
  missing+=(docker-compose)
fi
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && have apt-get; then
  echo "prereqs: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
  exit 0
fi

if have apt-get; then why="not root"; else why="no apt-get; these are Debian's names"; fi
echo "prereqs: make test needs ${missing[*]} and cannot install them ($why). Run:" >&2
echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
exit 1
