# Sourced by scripts/demo and scripts/test: installs the Debian packages
# Musubi's build, tests and labs use, when any is missing.
#   a C toolchain, protoc and   etcd-client's build
#   its well-known types
#   etcd-server                 the store tests against a real etcd
#   wireguard-go, nftables,     the Linux datapath in network namespaces
#   iproute2, util-linux
#   iputils-ping, python3       the probes of the tests and `musubi lab check`
# and, with `ensure_packages kernel-lab` (the test suite only; the demo
# installs no kernel):
#   qemu-system-x86,            the kernel lab: Debian's kernel (WireGuard
#   linux-image-amd64,          and VRF modules) booted under QEMU, its
#   busybox-static, cpio,       initramfs built from Debian's
#   zstd, xz-utils
#   chromium, chromium-driver,  the dashboard's test in a real browser
#   python3-selenium,           (headless), Japanese labels in its
#   fonts-ipafont-gothic        screenshots
#   curl                        the dashboard's TLS test
#   python3-jsonschema, -yaml,  the .clab.yml files checked against
#   -regex                      containerlab's schema
ensure_packages() {
  local packages=(build-essential pkg-config protobuf-compiler libprotobuf-dev etcd-server wireguard-go wireguard-tools
    nftables iproute2 iputils-ping python3 util-linux)
  if [ "${1:-}" = kernel-lab ]; then
    packages+=(qemu-system-x86 linux-image-amd64 busybox-static cpio zstd xz-utils
      chromium chromium-driver python3-selenium fonts-ipafont-gothic curl
      python3-jsonschema python3-yaml python3-regex)
  fi
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    local sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}
