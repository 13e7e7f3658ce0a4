#!/usr/bin/env bash
# Builds what a real node of the test cluster runs, once per version, into a cache outside the
# repo: kubelet, kube-scheduler and kube-proxy from the same k8s.io/kubernetes module as the
# control plane (build.sh), CoreDNS and crictl from their Go modules, and the pause binary from
# the kubernetes module's own source. Prints the bin folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
K8S_VERSION=v1.35.4
COREDNS_VERSION=v1.15.0
CRICTL_VERSION=v1.37.0
RECIPE=2   # bump when the build itself changes (flags), so cached binaries are rebuilt
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/node-${K8S_VERSION}-coredns-${COREDNS_VERSION}-crictl-${CRICTL_VERSION}-r${RECIPE}"
bin="$cache/bin"
K8S_CMDS=(kubelet kube-scheduler kube-proxy)
all=("${K8S_CMDS[@]}" coredns crictl pause)
missing() { for b in "${all[@]}"; do [[ -x "$bin/$b" ]] || return 0; done; return 1; }
if ! missing; then echo "$bin"; exit 0; fi
mkdir -p "$bin"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
start=$(date +%s)
# Modules without replace directives: `go install module@version` builds them as released.
[[ -x "$bin/coredns" ]] || GOBIN="$work/gobin" go install -trimpath -ldflags=-s "github.com/coredns/coredns@$COREDNS_VERSION"
[[ -x "$bin/crictl" ]] || GOBIN="$work/gobin" go install -trimpath -ldflags=-s "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
for b in coredns crictl; do [[ -x "$work/gobin/$b" ]] && mv "$work/gobin/$b" "$bin/$b"; done
cp -r "$here/k8s" "$work/"
( cd "$work/k8s" && go mod tidy -e >&2 || true
  cd "$work/k8s" && go get k8s.io/kubernetes@"$K8S_VERSION" >&2
  # The version stamps a release build sets (hack/lib/version.sh): Nodes report kubelet v1.35.4.
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  stamp=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  for cmd in "${K8S_CMDS[@]}"; do
    [[ -x "$bin/$cmd" ]] && continue
    go build -trimpath -ldflags="-s$stamp" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" && mv "$bin/$cmd.tmp" "$bin/$cmd"
  done
  # The pod sandbox's process: upstream's pause.c, static, as the registry.k8s.io/pause image has it.
  src="$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  ${CC:-cc} -Os -static -DVERSION="$K8S_VERSION" -o "$bin/pause.tmp" "$src" && mv "$bin/pause.tmp" "$bin/pause" )
echo "built node binaries in $(( $(date +%s) - start ))s" >&2
echo "$bin"
