#!/usr/bin/env bash
# Install vitcnn_store into this Ray node's Python, one torch build chosen explicitly.
# The one recipe behind both deployments that install the package themselves:
# cluster/docker/Dockerfile (the KubeRay/dask image) and the nodes of `ray up`
# (cluster/aws/ray-cluster.yaml), so both hold the same builds.
#
#   install.sh PLATFORM WHEEL_DIR   torch + torchvision from https://download.pytorch.org/whl/PLATFORM,
#                                   then WHEEL_DIR/vitcnn_store-*.whl with its other dependencies
#                                   (PyPI; s3fs among them), then check the result
#   install.sh --check PLATFORM     only check the torch already installed against PLATFORM
#
# PLATFORM is `cpu` or `cuXYZ` (cu128 = CUDA 12.8): the same word names Ray's image tag
# (rayproject/ray:RAY-pyXY-PLATFORM) and PyTorch's wheel index, so the torch build always
# matches the base image's CUDA. The check fails when it does not: torch's CUDA version
# must equal PLATFORM's (none for cpu) and, in an NVIDIA CUDA image, the image's own
# CUDA_VERSION.
#
# Environment: TORCH_VERSION / TORCHVISION_VERSION pin the pair (default: the pair the
# project is tested with); PYTHON (default: python, the image's); VITCNN_INSTALL_DRY_RUN=1
# prints the pip commands instead of running them.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
PYTHON="${PYTHON:-python}"
TORCH_INDEX_BASE="https://download.pytorch.org/whl"

die() { echo "install.sh: $1" >&2; exit "${2:-1}"; }
usage() { sed -n '7,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

check_platform_word() {
    [[ "$1" =~ ^(cpu|cu[0-9]{3})$ ]] \
        || die "PLATFORM must be cpu or cuXYZ (e.g. cu128), got '$1'" 2
}

run() {  # a command of the recipe, or only its words under VITCNN_INSTALL_DRY_RUN=1
    if [ "${VITCNN_INSTALL_DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

# torch's CUDA version against PLATFORM and against the image's CUDA_VERSION.
check_torch() {
    "$PYTHON" - "$1" "$TORCH_VERSION" <<'EOF'
import importlib.util
import os
import sys

# torch/version.py alone (written when the wheel was built): no need to load torch itself.
spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    sys.exit("install.sh: torch is not installed")
path = os.path.join(spec.submodule_search_locations[0], "version.py")
with open(path) as f:
    torch_version = {}
    exec(compile(f.read(), path, "exec"), torch_version)
version, cuda = torch_version["__version__"], torch_version["cuda"]

platform, wanted_version = sys.argv[1], sys.argv[2]
if version.partition("+")[0] != wanted_version:
    sys.exit(f"install.sh: torch is {version}, not the pinned {wanted_version}")
if platform == "cpu":
    if cuda is not None:
        sys.exit(f"install.sh: PLATFORM=cpu but torch {version} is built for CUDA {cuda}; "
                 "install it from the cpu index")
    print(f"torch {version}: CPU build, as PLATFORM=cpu asks")
    sys.exit(0)
digits = platform[2:]
wanted = f"{int(digits[:-1])}.{digits[-1]}"
if cuda != wanted:
    sys.exit(f"install.sh: PLATFORM={platform} wants CUDA {wanted} but torch {version} "
             f"is built for {cuda or 'no CUDA (CPU build)'}")
image_cuda = os.environ.get("CUDA_VERSION")  # set by every nvidia/cuda-based image
if image_cuda:
    if ".".join(image_cuda.split(".")[:2]) != wanted:
        sys.exit(f"install.sh: the image has CUDA {image_cuda} but PLATFORM={platform} "
                 f"(torch for CUDA {wanted}); use the base image tag ...-{platform}")
    print(f"torch {version}: CUDA {wanted}, the image's CUDA {image_cuda}")
else:
    print(f"torch {version}: CUDA {wanted} (no CUDA_VERSION here to compare)")
EOF
}

if [ "${1:-}" = --check ]; then
    [ $# -eq 2 ] || { usage >&2; exit 2; }
    check_platform_word "$2"
    check_torch "$2"
    exit 0
fi
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[ $# -eq 2 ] || { usage >&2; exit 2; }
platform="$1"
wheel_dir="$2"
check_platform_word "$platform"

shopt -s nullglob
wheels=("$wheel_dir"/vitcnn_store-*.whl)
shopt -u nullglob
fix="build it with 'python -m pip wheel --no-deps -w cluster/docker/dist .' from the repository root"
[ ${#wheels[@]} -gt 0 ] || die "no vitcnn_store-*.whl in $wheel_dir; $fix" 2
[ ${#wheels[@]} -eq 1 ] \
    || die "${#wheels[@]} vitcnn_store wheels in $wheel_dir (${wheels[*]##*/}); keep one" 2

# torch first, from the index of PLATFORM only: a later `pip install` keeps it, since
# vitcnn_store asks for torch>=2.4 and torchvision>=0.19, not for a build.
run "$PYTHON" -m pip install --no-cache-dir --index-url "$TORCH_INDEX_BASE/$platform" \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
run "$PYTHON" -m pip install --no-cache-dir "${wheels[0]}"
if [ "${VITCNN_INSTALL_DRY_RUN:-0}" = 1 ]; then
    exit 0
fi
check_torch "$platform"
"$PYTHON" -c "import vitcnn_store, jobs.extract, timm, zarr, xarray, s3fs, distributed, ray" \
    || die "vitcnn_store does not import after the install"
echo "vitcnn_store $("$PYTHON" -c 'import vitcnn_store; print(vitcnn_store.__version__)') installed"
