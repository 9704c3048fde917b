#!/usr/bin/env bash
# Installs ibis-jax with every extra into the current Python (3.11). Idempotent.
#   - the package, JAX side and PyTorch tool side, with the versions pinned in setup.py (`ibis-jax
#     plan` needs the `plan` extra on top: pip install -e ".[plan]", libtpu, 213 MB);
#   - sam2==1.1.0, source-only on PyPI, built after torch without build isolation (docs/design.md section 7);
#   - stardist's wheel without its dependencies: we only read its sample nuclei images (the demo
#     data), never import it (it would pull TensorFlow).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[all]"
python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 python -m pip install --quiet --no-build-isolation sam2==1.1.0
python -c "import importlib.util as u; assert u.find_spec('stardist')" 2>/dev/null \
  || python -m pip install --quiet --no-deps stardist==0.9.2 csbdeep==0.8.2
python -c "import ibis_jax, tool_bridge, sam2, jax, flax, torch; print('ibis-jax installed: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
