#!/usr/bin/env bash
# What the test suite needs from the machine, from Debian's packages (root or sudo; idempotent):
# Ceph RGW, a real S3 server for the fleet tests (deploy/s3/install-rgw.sh), Chromium, which the tests open
# report.html and the docs site in, and openssl. The README's test command runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/s3/install-rgw.sh
# PyPI's torchvision is a CUDA build that does not import beside the CPU torch (docs/design.md): a .pth
# in this Python's site-packages runs tests/torchvision_cpu.py at start-up, in every process of a
# test run. It only adds an import hook, and does nothing when torchvision's own ops load.
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$PWD/tests/torchvision_cpu.py"
echo "import os; p = '$shim'; os.path.exists(p) and exec(compile(open(p).read(), p, 'exec'), {'__name__': 'edgeslim_tests_torchvision_cpu'})" \
  > "$site/edgeslim_tests_torchvision_cpu.pth"
echo "torchvision shim: $site/edgeslim_tests_torchvision_cpu.pth"
# Chromium opens report.html and the docs site; openssl makes the certificates the documented TLS setup uses.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -eq 0 ]; then
  echo "chromium: already installed ($(chromium --version 2>/dev/null)); openssl: $(openssl version)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
$SUDO apt-get update -q
# chromium: 25 packages, ~113 MB to download, ~414 MB installed; about 20 s on the 2-core CI machine.
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
echo "${need[*]}: installed in $(( $(date +%s) - start )) s"
