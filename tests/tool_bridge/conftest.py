"""Fixtures for the tool bridge: a random-weight MedSAM2 checkpoint in the real layout, servers.

The checkpoint is SAM2.1 Hiera-T built at 512 px with the MedSAM2 overrides, seeded, and saved as
``{"model": state_dict}`` like ``MedSAM2_latest.pt``; everything else loads it the real way.
torch and sam2 are imported inside the fixtures, so the torch-free tests run without them.
"""

from __future__ import annotations

import pytest

from bridge_helpers import THREADS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long tests (subprocess servers, many encodes)")


def build_random_medsam2(seed: int = 0):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2

    from tool_bridge.backends.medsam2 import MEDSAM2

    torch.manual_seed(seed)
    return build_sam2(MEDSAM2.config_file, None, device="cpu", hydra_overrides_extra=list(MEDSAM2.overrides))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_random.pt"
    torch.save({"model": build_random_medsam2().state_dict()}, path)
    return str(path)


@pytest.fixture(scope="session")
def backend(checkpoint):
    from tool_bridge.backends.medsam2 import MedSAM2Backend

    return MedSAM2Backend(checkpoint, device="cpu", num_threads=THREADS)


@pytest.fixture(scope="session")
def server(backend):
    from tool_bridge.server import ServerConfig, ServerThread

    thread = ServerThread(backend, ServerConfig(port=0, max_batch=4, max_wait_ms=5, max_clicks=8,
                                                max_image_side=256))
    yield thread
    thread.stop()
