#!/usr/bin/env bash
# Install the PostgreSQL server that tests/test_pg_jobs.py starts throwaway clusters of
# (initdb + pg_ctl; Debian's postgresql package). Idempotent, quick when it is there. Run as
# root (apt) from anywhere; deploy/tools/install-tools.sh calls it (`make install`).
# Debian keeps the binaries in /usr/lib/postgresql/<version>/bin, not on PATH: this script
# prints that directory; devtools/pg.py finds it the same way.
set -euo pipefail

pg_bindir() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return
  fi
  local d found=""
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then found=$d; fi
  done
  echo "$found"
}

if [ -z "$(pg_bindir)" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  # Debian's package creates a cluster of its own (port 5432) and may start it; the tests
  # start their own, so it is stopped and its service disabled.
  if command -v systemctl >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
    systemctl disable --now postgresql >/dev/null 2>&1 || true
  fi
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _port status _rest; do
      if [ "$status" = online ]; then pg_ctlcluster "$ver" "$name" stop || true; fi
    done
  fi
fi

dir=$(pg_bindir)
if [ -z "$dir" ]; then
  echo "install-postgres.sh: no initdb/pg_ctl found after installing postgresql" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  # PostgreSQL refuses to run as root; the tests run it as this user (Debian's package makes it).
  echo "install-postgres.sh: the postgres system user is missing" >&2
  exit 1
fi
echo "install-postgres.sh: PostgreSQL server ready in $dir"
