"""Object storage (``gs://``): user paths, committed folders, local staging and spools.

An object store has no rename: each object becomes visible on its own the moment it is written, so
the temporary-name-and-rename pattern of :mod:`ibis_jax.fileio` does not exist there. Instead a
remote folder counts as complete only when its commit marker (``_COMMITTED.json``, the list of
its files with their sizes and SHA-256) is present: :func:`stage_up` deletes the old marker first,
uploads the files (shard manifest entries after their shards), deletes objects the new listing
does not hold and writes the marker last; :func:`stage_down` refuses a folder without one and
checks every downloaded file against it. A writer killed at any point leaves no marker, and so
nothing a reader takes for complete.

Commands work on local folders and move them at the edges:

- inputs (a dataset, an HF dir for ``--init`` / ``hf_dir`` / ``--policy``): :func:`stage_down`
  into a local cache (``$IBIS_JAX_CACHE``, else ``$XDG_CACHE_HOME/ibis-jax``, else
  ``~/.cache/ibis-jax``), once per content: a cached copy whose marker equals the remote one is
  reused;
- outputs (``synth --out``, ``eval --out``, ...): :func:`output_dir` yields a local staging folder
  (holding what the remote folder already had, so a rerun resumes) and commits it on success;
- training workdirs: :func:`spool` makes a local folder that names its remote (``.ibis-remote``);
  checkpoints go straight to the remote through Orbax (:func:`checkpoint_root`), metrics and
  TensorBoard events are uploaded on a cadence and at exit (:func:`sync_files`), an export or the
  tokenizer is committed with :func:`publish`.

Served schemes: ``gs`` (through gcsfs, which honours ``STORAGE_EMULATOR_HOST``). Any other URL is
refused in one line naming it (:func:`check_path`), never written somewhere else.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ibis_jax.errors import DataError, UserError

SCHEMES = ("gs",)
MARKER = "_COMMITTED.json"  # a remote folder's commit marker, written last
SPOOL_FILE = ".ibis-remote"  # in a local spool folder: the URL it mirrors
LAST = ("*.manifest.json",)  # uploaded after everything else (a shard's entry after the shard)


class _QuietBucketType(logging.Filter):
    """gcsfs warns on every bucket it cannot classify without credentials (an emulator, or a
    bucket of another project): true, and not something a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_QuietBucketType())
for _name in ("fsspec", "gcsfs"):  # per-read INFO lines (cache settings) under the commands' INFO logging
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


# -- user paths ----------------------------------------------------------------------------------

def scheme(path: str | os.PathLike) -> str | None:
    """``gs`` of ``gs://b/x``; ``None`` for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0].lower() if "://" in text else None


def is_remote(path: str | os.PathLike | None) -> bool:
    return path is not None and scheme(path) is not None


def check_path(path: str | os.PathLike, what: str = "path") -> str:
    """``path`` as a string, when this code can serve it: a local path or a ``gs://`` URL. An
    unknown scheme, or a URL whose ``//`` was collapsed (``gs:/bucket``), is refused in one line."""
    text = os.fspath(path)
    found = scheme(text)
    if found is not None and found not in SCHEMES:
        raise UserError(f"{what} {text}: the {found}:// scheme is not served (only {', '.join(s + '://' for s in SCHEMES)} "
                        "and local paths); copy the data to one of those")
    if found is None:
        head = text.split("/", 1)[0]
        if head.endswith(":") and len(head) > 2:  # gs:/bucket/x (a URL with one slash), s3:bucket
            raise UserError(f"{what} {text}: looks like a URL missing '//' (write {head}//...); refusing to treat it "
                            "as a local folder")
    if found == "gs" and not text[len("gs://"):].strip("/"):
        raise UserError(f"{what} {text}: no bucket; write gs://BUCKET/PATH")
    return text


def check_local(path: str | os.PathLike | None, what: str) -> str | None:
    """``path`` when it is local; a URL is refused in one line (inputs read only from disk)."""
    if path is None:
        return None
    text = check_path(path, what)
    if is_remote(text):
        raise UserError(f"{what} {text}: read from local files only; copy it down first (e.g. gcloud storage cp -r)")
    return text


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a URL or a local path (``os.path.join`` is right for both here, but a
    URL's trailing slashes are trimmed first)."""
    text = os.fspath(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(text, *parts)


def _fs(url: str):
    """(fsspec filesystem, path within it) of a ``gs://`` URL."""
    check_path(url)
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise UserError(f"{url}: gs:// needs gcsfs (pip install gcsfs): {e}") from None


def exists(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    if not is_remote(text):
        return os.path.exists(text)
    fs, p = _fs(text)
    fs.invalidate_cache(p)  # another process may have written it since this one listed the folder
    return fs.exists(p)


def read_text(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if not is_remote(text):
        return Path(text).read_text(encoding="utf-8")
    fs, p = _fs(text)
    fs.invalidate_cache(p)
    with fs.open(p, "rb") as handle:
        return handle.read().decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """One object (visible whole or not at all: an object store's writes are atomic per object)."""
    fs, p = _fs(url)
    with fs.open(p, "wb") as handle:
        handle.write(data)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- committed folders ---------------------------------------------------------------------------

def read_marker(remote_dir: str) -> dict[str, Any] | None:
    """The commit marker of a remote folder, or ``None`` (not committed, or unreadable)."""
    try:
        marker = json.loads(read_text(join(remote_dir, MARKER)))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def is_committed(remote_dir: str) -> bool:
    return read_marker(remote_dir) is not None


def _local_files(local_dir: Path) -> list[str]:
    skip = {MARKER, SPOOL_FILE}
    return sorted(str(p.relative_to(local_dir)).replace(os.sep, "/") for p in local_dir.rglob("*")
                  if p.is_file() and p.name not in skip and ".partial-" not in p.name and not p.name.endswith(".tmp"))


def stage_up(local_dir: str | os.PathLike, remote_dir: str, *, last: Sequence[str] = LAST,
             after_upload: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Uploads a local folder and commits it: the old marker is deleted first, then the files are
    uploaded (those matching ``last`` after the others), remote objects the listing does not hold
    are deleted, and the marker is written last. Returns the marker.

    after_upload: called with each uploaded relative name (tests kill the writer there)."""
    local = Path(local_dir)
    if not local.is_dir():
        raise FileNotFoundError(2, "no folder to upload", str(local))
    fs, root = _fs(check_path(remote_dir))
    root = root.rstrip("/")
    marker_path = f"{root}/{MARKER}"
    fs.invalidate_cache(root)
    if fs.exists(marker_path):
        fs.rm_file(marker_path)  # from here on readers see the folder as uncommitted
    names = _local_files(local)
    ordered = [n for n in names if not any(fnmatch.fnmatch(os.path.basename(n), g) for g in last)]
    ordered += [n for n in names if n not in ordered]
    files = {}
    for name in ordered:
        source = local / name
        files[name] = {"bytes": source.stat().st_size, "sha256": sha256(source)}
        fs.put_file(str(source), f"{root}/{name}")
        if after_upload is not None:
            after_upload(name)
    with contextlib.suppress(FileNotFoundError):
        stale = [p for p in fs.find(root) if p.removeprefix(root + "/") not in files and not p.endswith("/" + MARKER)]
        if stale:
            fs.rm(stale)
    fs.invalidate_cache(root)
    marker = {"files": files, "committed_at": time.time()}
    with fs.open(marker_path, "wb") as handle:
        handle.write(json.dumps(marker, indent=1).encode("utf-8"))
    return marker


def cache_root() -> Path:
    """Where remote inputs are staged and spools live (see the module docstring)."""
    explicit = os.environ.get("IBIS_JAX_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ibis-jax"


def _cache_dir(kind: str, url: str) -> Path:
    key = hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return cache_root() / kind / f"{tail}-{key}"


def _local_marker(local_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((local_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def stage_down(remote_dir: str, local_dir: str | os.PathLike | None = None, *, what: str = "folder") -> str:
    """A committed remote folder as a local one (``local_dir``, default a cache folder), every file
    checked against the marker's size and SHA-256. A cached copy with the same marker is reused; a
    folder without a marker (never committed, or its writer was killed) is refused, naming it."""
    remote_dir = check_path(remote_dir, what).rstrip("/")
    marker = read_marker(remote_dir)
    if marker is None:
        hint = "" if exists(remote_dir) else " (nothing there)"
        raise DataError(f"{what} {remote_dir}: not a committed folder{hint}: no {MARKER}, so its writer did not "
                        "finish; rerun the command that writes it")
    target = Path(local_dir) if local_dir is not None else _cache_dir("staged", remote_dir)
    if _local_marker(target) == marker:
        return str(target)
    fs, root = _fs(remote_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for name, entry in marker["files"].items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{name}", str(dest))
            if dest.stat().st_size != entry["bytes"] or sha256(dest) != entry["sha256"]:
                raise DataError(f"{remote_dir}/{name}: its size or SHA-256 differs from {MARKER} (overwritten after the "
                                "commit, or corrupt); rerun the command that writes it")
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _replace_dir(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _replace_dir(tmp: Path, target: Path, marker: dict[str, Any]) -> None:
    """Renames ``tmp`` to ``target``; another process that got there first with the same content
    wins (several processes of one host stage the same inputs at once)."""
    if target.exists():
        if _local_marker(target) == marker:
            return
        old = target.with_name(f".{target.name}.partial-old-{os.getpid()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if _local_marker(target) != marker:
            raise


def stage_input(path: str | os.PathLike | None, what: str) -> str | None:
    """A user's input folder as a local path: a ``gs://`` one is staged down (committed folders
    only, verified), a local one is returned as it is, an unknown scheme is refused."""
    if path is None:
        return None
    text = check_path(path, what)
    return stage_down(text, what=what) if is_remote(text) else text


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, what: str = "--out") -> Iterator[str]:
    """A folder to write a command's output into. Local: ``path`` itself. ``gs://``: a
    local staging folder holding the remote folder's committed files (a rerun resumes), uploaded
    and committed when the block ends without an exception; an exception uploads nothing."""
    text = check_path(path, what)
    if not is_remote(text):
        yield text  # the command creates it, as it always did
        return
    staging = _cache_dir("out", text)
    if is_committed(text):
        stage_down(text, staging, what=what)
    else:
        staging.mkdir(parents=True, exist_ok=True)
    yield str(staging)
    marker = stage_up(staging, text)
    (staging / MARKER).write_text(json.dumps(marker, indent=1))  # the next run reuses this copy


# -- spools: a local mirror of a remote training workdir ----------------------------------------

def spool(workdir: str, pull: Sequence[str] = ("metrics.jsonl",), pull_dirs: Sequence[str] = ("tokenizer",)) -> str:
    """The local folder that mirrors the remote ``workdir`` (one per URL and host: processes of a
    host share it). It names its remote in ``.ibis-remote``; the remote's ``pull`` files and
    committed ``pull_dirs`` are fetched when the local copy lacks them (a resume on another host)."""
    workdir = check_path(workdir, "--workdir").rstrip("/")
    if not is_remote(workdir):
        return workdir
    local = _cache_dir("spool", workdir)
    local.mkdir(parents=True, exist_ok=True)
    marker = local / SPOOL_FILE
    if not marker.exists():
        from ibis_jax.fileio import atomic_write_text

        atomic_write_text(marker, workdir)
    fs, root = _fs(workdir)
    for name in pull:
        if not (local / name).exists() and fs.exists(f"{root}/{name}"):
            from ibis_jax.fileio import atomic_file

            with atomic_file(local / name) as tmp:
                fs.get_file(f"{root}/{name}", str(tmp))
    for name in pull_dirs:
        if not (local / name).exists() and is_committed(join(workdir, name)):
            stage_down(join(workdir, name), local / name, what=f"{workdir}/{name}")
    return str(local)


def remote_of(local_path: str | os.PathLike) -> str | None:
    """The URL a path inside a spool mirrors (``None`` for any other path)."""
    path = Path(os.path.abspath(os.fspath(local_path)))
    for folder in (path, *path.parents):
        marker = folder / SPOOL_FILE
        if marker.is_file():
            rel = path.relative_to(folder)
            return join(marker.read_text().strip(), *rel.parts)
    return None


def checkpoint_root(workdir: str | os.PathLike):
    """``etils.epath`` path of the folder checkpoints go to: the remote of a spool (Orbax writes
    ``gs://`` through TensorStore), else the workdir itself."""
    from ibis_jax.fileio import as_path

    return as_path(remote_of(workdir) or check_path(workdir, "--workdir"))


def publish(local_dir: str | os.PathLike) -> str | None:
    """Uploads and commits a folder inside a spool to its remote; ``None`` (nothing to do) for any
    other folder. Call it on one process."""
    remote = remote_of(local_dir)
    if remote is None:
        return None
    stage_up(local_dir, remote)
    return remote


def share(local_dir: str | os.PathLike, leader: bool, barrier: Callable[[], None]) -> None:
    """A folder the ``leader`` process wrote in a spool, made present on every host: published
    (unless its remote is already committed), ``barrier()``, then staged down where missing."""
    remote = remote_of(local_dir)
    if leader and remote is not None and not is_committed(remote):
        stage_up(local_dir, remote)
    barrier()
    if not leader and remote is not None and not os.path.isdir(local_dir):
        stage_down(remote, local_dir, what=remote)


def sync_files(local_dir: str | os.PathLike, names: Sequence[str] = ("metrics.jsonl", "tb")) -> None:
    """Uploads the named files and folders of a spool (whole objects, replaced: an upload is seen
    whole or not at all) to its remote; nothing for a folder outside a spool."""
    remote = remote_of(local_dir)
    if remote is None:
        return
    fs, root = _fs(remote)
    local = Path(local_dir)
    for name in names:
        source = local / name
        items = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else []
        for item in items:
            fs.put_file(str(item), f"{root}/{item.relative_to(local).as_posix()}")


class Syncer:
    """Calls :func:`sync_files` at most every ``every_s`` seconds (:meth:`maybe`) and at the end
    (:meth:`now`); a no-op outside a spool."""

    def __init__(self, local_dir: str | os.PathLike, names: Sequence[str] = ("metrics.jsonl", "tb"),
                 every_s: float = 60.0):
        self.local_dir, self.names, self.every_s = local_dir, tuple(names), every_s
        self.enabled = remote_of(local_dir) is not None
        self._last = time.monotonic()

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last >= self.every_s

    def maybe(self) -> None:
        if self.due():
            self.now()

    def now(self) -> None:
        if self.enabled:
            try:
                sync_files(self.local_dir, self.names)
            except OSError as e:  # a network blip must not kill a training run: next time
                logging.getLogger(__name__).warning("upload of %s to %s failed (%s); retrying later",
                                                    self.names, remote_of(self.local_dir), e)
            self._last = time.monotonic()
