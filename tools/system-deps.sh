#!/usr/bin/env bash
# The programs the test suite runs for real, from Debian's packages: prometheus and promtool (tests/e2e), haproxy (the
# affinity proxy of tests/integration/deploy and tests/unit/deploy) and kubectl (`kubectl kustomize`, tests/unit/deploy). `make test`
# calls this first: as root it installs what is missing with apt-get; otherwise it stops and prints the command.
set -euo pipefail
declare -A package_of=([prometheus]=prometheus [promtool]=prometheus [haproxy]=haproxy [kubectl]=kubectl)
# haproxy lives in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for program in "${!package_of[@]}"; do
  command -v "$program" >/dev/null || missing+=("${package_of[$program]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "make test needs Debian packages that are not installed: ${packages[*]}" >&2
  echo "install them, then run make test again:  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}" >&2
  exit 1
fi
echo "installing Debian packages for the tests: ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
