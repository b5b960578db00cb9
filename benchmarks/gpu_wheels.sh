#!/usr/bin/env bash
# benchmarks/gpu_wheels.sh: download, on a machine with a package registry, the wheels a lent GPU machine lacks for
# benchmarks/gpu.sh, into .whl/ (ignored by git; carry it with the working tree, 64 MiB at most).
#
# What it downloads: the dependency closure of this package and sparsify, at the versions this checkout's .venv holds,
# less what the GPU image holds, torch, triton and the CUDA libraries (the image's own are the ones that match its driver). The
# image's packages are listed below, as the device tool's KINDS.md read them on 2026-11-17; extend the list when the
# image changes. Wheels for CPython 3.12 on manylinux x86-64, the image's Python.
#
#     bash benchmarks/gpu_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numpy numpyro nvidia-ml-py onnx onnxruntime opencv-python-headless optax opt-einsum orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich safetensors scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard threadpoolctl tiktoken timm tokenizers toolz torch torchaudio torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
normalise() { tr '[:upper:]_.' '[:lower:]--'; }
image=" $(echo "$IMAGE_PACKAGES" | tr '\n' ' ' | normalise) "
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
# The dependency closure of this package and sparsify (no extras), at the versions installed in the venv.
mapfile -t closure < <("$PYTHON" - <<'PY'
import importlib.metadata as metadata
import re

from packaging.requirements import Requirement

seen, todo = {}, ["sae-lens-hierarchical", "eai-sparsify"]
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    try:
        seen[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        continue
    for line in metadata.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)
for name, version in sorted(seen.items()):
    print(f"{name}=={version}")
PY
)
missing=()
for pin in "${closure[@]}"; do
    key=${pin%%==*}
    case $key in nvidia-* | torch | triton | sae-lens-hierarchical) continue ;; esac
    [[ $image == *" $key "* ]] || missing+=("$pin")
done
echo "downloading ${#missing[@]} wheels: ${missing[*]}"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
for pin in "${missing[@]}"; do  # one at a time: a package published as a source archive only is built into a wheel
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$pin" 2>/dev/null ||
        "$PYTHON" -m pip wheel --quiet --no-deps -w .whl "$pin"
done
du -sh .whl
