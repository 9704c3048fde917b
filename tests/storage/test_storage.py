"""ibis_jax.storage against the GCS emulator: paths, commit markers, killed writers, spools."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ibis_jax import storage
from ibis_jax.errors import DataError, UserError


def _folder(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.mark.parametrize("path", ["s3://bucket/x", "hdfs://h/x", "gs:/bucket/x", "gs://"])
def test_unserved_schemes_are_refused_in_one_line(path):
    with pytest.raises(UserError) as e:
        storage.check_path(path, "--out")
    assert "\n" not in str(e.value) and path in str(e.value)


def test_local_paths_pass_unchanged(tmp_path):
    assert storage.check_path(str(tmp_path / "a")) == str(tmp_path / "a")
    assert storage.check_path("relative/dir") == "relative/dir"


def test_stage_up_commits_and_stage_down_verifies(gcs_url, tmp_path):
    src = _folder(tmp_path / "src", {"a.bin": b"a" * 1000, "sub/b.txt": b"bee", "x.manifest.json": b"{}"})
    remote = gcs_url + "/export"
    assert not storage.is_committed(remote)
    order = []
    marker = storage.stage_up(src, remote, after_upload=order.append)
    assert order[-1] == "x.manifest.json"  # manifest entries after their shards
    assert storage.is_committed(remote) and set(marker["files"]) == {"a.bin", "sub/b.txt", "x.manifest.json"}
    local = storage.stage_down(remote)
    assert open(os.path.join(local, "sub/b.txt"), "rb").read() == b"bee"
    assert storage.stage_down(remote) == local  # cached: the same marker is reused

    # a rewrite with fewer files deletes the stale objects; a tampered object is refused by readers
    (src / "a.bin").unlink()
    storage.stage_up(src, remote)
    assert not storage.exists(remote + "/a.bin")
    storage.write_bytes(remote + "/sub/b.txt", b"tampered")
    with pytest.raises(DataError, match="SHA-256"):
        storage.stage_down(remote, tmp_path / "fresh")


def test_uncommitted_folder_is_refused(gcs_url):
    storage.write_bytes(gcs_url + "/half/model.safetensors", b"x")
    with pytest.raises(DataError, match="not a committed folder"):
        storage.stage_down(gcs_url + "/half", what="--init")


KILLER = textwrap.dedent("""
    import os, signal, sys
    from ibis_jax import storage
    uploaded = []
    def kill(name):
        uploaded.append(name)
        if len(uploaded) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    storage.stage_up(sys.argv[1], sys.argv[2], after_upload=kill)
""")


@pytest.mark.parametrize("kill_after", [1, 2, 3])
def test_writer_killed_mid_export_leaves_nothing_committed(gcs_url, tmp_path, kill_after):
    """A first export and a re-export over a committed one, each SIGKILLed after some objects:
    no marker, so stage_down refuses the folder (never a mix of old and new shards)."""
    src = _folder(tmp_path / "hf", {"config.json": b"{}", "model-00001-of-00002.safetensors": b"1" * 100,
                                    "model-00002-of-00002.safetensors": b"2" * 100})
    for remote, committed_before in ((gcs_url + "/new", False), (gcs_url + "/again", True)):
        if committed_before:
            storage.stage_up(src, remote)
            (src / "model-00001-of-00002.safetensors").write_bytes(b"3" * 100)
        proc = subprocess.run([sys.executable, "-c", KILLER, str(src), remote, str(kill_after)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
        assert not storage.is_committed(remote)
        with pytest.raises(DataError, match="not a committed folder"):
            storage.stage_down(remote, tmp_path / f"read-{committed_before}")


def test_spool_names_its_remote_and_publishes(gcs_url, tmp_path, monkeypatch):
    workdir = gcs_url + "/run"
    local = storage.spool(workdir)
    assert not local.startswith("gs:") and os.path.isabs(local)
    assert storage.remote_of(os.path.join(local, "hf")) == workdir + "/hf"
    assert str(storage.checkpoint_root(local)).startswith("gs://") and storage.remote_of(tmp_path) is None
    _folder(__import__("pathlib").Path(local) / "hf", {"config.json": b"{}"})
    assert storage.publish(os.path.join(local, "hf")) == workdir + "/hf"
    assert storage.is_committed(workdir + "/hf")
    with open(os.path.join(local, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    storage.sync_files(local)
    assert storage.read_text(workdir + "/metrics.jsonl") == '{"step": 1}\n'
    # another host (a fresh cache) resumes: the metrics come down with the spool
    monkeypatch.setenv("IBIS_JAX_CACHE", str(tmp_path / "other-host"))
    other = storage.spool(workdir)
    assert other != local and open(os.path.join(other, "metrics.jsonl")).read() == '{"step": 1}\n'
