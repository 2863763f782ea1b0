#!/usr/bin/env bash
# Bring up meshgen's Istio target on kind: create the cluster, install Istio, load the service and mock images,
# apply generated/istio (kustomize), wait for the Deployments, send one smoke request through the gateway on
# NodePort 30080 (the first api-key region's, published on localhost:8080 by kind/cluster.yaml).
#
#   kind/bootstrap.sh            do it (needs docker, kind, kubectl, istioctl)
#   kind/bootstrap.sh --dry-run  print the steps and the manifests it would apply; needs none of them
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
manifests="${MESHGEN_ISTIO_DIR:-$root/generated/istio}"
cluster="meshgen"
istio_version="${ISTIO_VERSION:-1.24.2}"
dry_run=0

usage() { echo "usage: $0 [--dry-run]" >&2; }

for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; exit 2 ;;
  esac
done

step() { printf '==> %s\n' "$*"; }

# run CMD...: print it; run it unless --dry-run
run() {
  printf '+ %s\n' "$*"
  if ((dry_run == 0)); then "$@"; fi
}

need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool" >&2; exit 1; }
  done
}

[[ -f "$manifests/kustomization.yaml" ]] || { echo "no $manifests/kustomization.yaml: run meshgen build" >&2; exit 1; }
if ((dry_run == 0)); then need docker kind kubectl istioctl curl; fi

step "1/6 create the kind cluster"
run kind create cluster --name "$cluster" --config "$here/cluster.yaml"

step "2/6 install Istio $istio_version (minimal profile: istiod; each region deploys its own ingress gateway)"
run istioctl install -y --set profile=minimal

step "3/6 build and load the images (docker-compose.yml: ext_proc/Dockerfile, meshgen/lab/Dockerfile)"
run docker build -t meshgen/service:dev -f "$root/ext_proc/Dockerfile" "$root"
run docker build -t meshgen/mocks:dev -f "$root/meshgen/lab/Dockerfile" "$root"
run kind load docker-image --name "$cluster" meshgen/service:dev meshgen/mocks:dev

step "4/6 apply $manifests"
if ((dry_run == 1)); then
  echo "+ kubectl apply -k $manifests"
  echo "--- manifests (from $manifests/kustomization.yaml) ---"
  while IFS= read -r rel; do
    echo "---"
    echo "# $rel"
    grep -v '^#' "$manifests/$rel"
  done < <(sed -n 's/^- //p' "$manifests/kustomization.yaml")
else
  run kubectl apply -k "$manifests"
fi

step "5/6 wait for every Deployment"
while IFS= read -r ns; do
  run kubectl wait --for=condition=Available deployment --all -n "$ns" --timeout=300s
done < <(sed -n 's/^- \(ai-lab-[a-z0-9-]*\)\/namespace.yaml$/\1/p' "$manifests/kustomization.yaml")

step "6/6 smoke request through the gateway"
run curl -sS --fail-with-body -m 30 http://localhost:8080/v1/chat/completions \
  -H 'authorization: Bearer sk-lab-platform' -H 'content-type: application/json' \
  -d '{"model": "llama3", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}'
step "done"
