"""Session fixtures shared by the model, sampler and training tests: a local tokenizer dir, tiny
random HF Qwen2.5-VL and Qwen3-VL models saved by transformers, their Flax loads and the processor
(built once per run)."""

from __future__ import annotations

import os
import tempfile

import pytest

# The commands' persistent compilation cache (ibis_jax.compilation): one folder per test session,
# never the user's ~/.cache; subprocesses of the tests inherit it.
os.environ.setdefault("IBIS_COMPILATION_CACHE", tempfile.mkdtemp(prefix="ibis-xla-cache-"))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir

    return make_tokenizer_dir(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="session")
def tiny_cfg(tok_dir):
    from ibis_jax.models.qwen2_5_vl.tiny import tiny_config

    return tiny_config(tok_dir)


@pytest.fixture(scope="session")
def hf_dir_and_model(tmp_path_factory, tiny_cfg, tok_dir):
    """(directory saved by transformers' save_pretrained, the torch model)."""
    pytest.importorskip("torch")
    from ibis_jax.models.qwen2_5_vl.testing import make_hf_model_dir

    d = str(tmp_path_factory.mktemp("qwen_hf"))
    model = make_hf_model_dir(d, tiny_cfg, tokenizer_dir=tok_dir, seed=0)
    return d, model


@pytest.fixture(scope="session")
def torch_model(hf_dir_and_model):
    return hf_dir_and_model[1]


@pytest.fixture(scope="session")
def flax_model(hf_dir_and_model):
    from ibis_jax.models.qwen2_5_vl import load_hf

    return load_hf(hf_dir_and_model[0])


@pytest.fixture(scope="session")
def processor(hf_dir_and_model):
    from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor

    return Qwen25VLProcessor(hf_dir_and_model[0])


@pytest.fixture(scope="session")
def q3_cfg(tok_dir):
    from ibis_jax.models import preset_config

    return preset_config("tiny_qwen3_vl", tok_dir)


@pytest.fixture(scope="session")
def q3_hf(tmp_path_factory, q3_cfg, tok_dir):
    """(directory written by transformers' save_pretrained, the torch Qwen3-VL model)."""
    pytest.importorskip("torch")
    from ibis_jax.models.qwen3_vl.testing import make_hf_model_dir

    d = str(tmp_path_factory.mktemp("qwen3_hf"))
    return d, make_hf_model_dir(d, q3_cfg, tokenizer_dir=tok_dir, seed=0)


@pytest.fixture(scope="session")
def q3_model(q3_hf):
    from ibis_jax.models.qwen3_vl import load_hf

    return load_hf(q3_hf[0])
