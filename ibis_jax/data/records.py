"""Trajectory records: one per episode, stored in sharded ArrayRecord files that grain reads.

The record is a project seam (ARCHITECTURE.md): synthesis writes it, SFT reads it, and evaluation
and rollouts write the same shape so that one report draws all of them. It holds the original
image once (PNG bytes), the ground truth and every step's mask as COCO RLE, and per step the click
(normalised and pixel), the user turn text, the reasoning, the action text, the whole assistant
turn, the loss weight and the IoU. Overlays are *not* stored: the training pipeline renders them
from image + mask when it reads a record.

A volume trajectory (``agent/volume.py``) shows the policy a different slice each turn, so its
record also holds the slices on view (``views``): before each step and once more at the end, the
slice index and which of the stored slice images (``view_pngs``, each distinct slice once) it
showed; ``image_png`` is the first one, ``height``/``width`` are a slice's. Its step masks are 2D as well: the 3D mask after the step
cut at the slice the *next* turn views (so ``observation_mask(t)`` is exactly what turn t saw), its
``gt_mask`` is None, and the 3D facts (shape, spacing, 3D Dice/IoU) are in ``meta["volume"]``.

Bytes layout of one record (``TrajectoryRecord.to_bytes``)::

    b"IBTR" | version: uint8 | header length: uint32 LE | header: UTF-8 JSON | image: PNG bytes
            | view images: PNG bytes each (their sizes in the header's ``view_png_sizes``)

Version 2 added the view images; version 1 records (no views) still read.

Files: ``trajectories-SSSSS-of-NNNNN.array_record`` (one record per trajectory). A shard is written
under a temporary name and renamed when complete, so a reader never sees a half-written shard.
After the rename its manifest entry ``trajectories-SSSSS-of-NNNNN.manifest.json`` (record count,
byte size, SHA-256) is written: a shard counts as complete only when its entry says so
(:func:`shard_is_complete`), and readers refuse a shard whose size disagrees with its entry, naming
the shard (as they do for a record that does not decode).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ibis_jax.data.rle import decode_rle
from ibis_jax.errors import DataError
from ibis_jax.fileio import atomic_write_json

MAGIC = b"IBTR"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SHARD_PATTERN = "trajectories-{index:05d}-of-{count:05d}.array_record"
SHARD_GLOB = "trajectories-*-of-*.array_record"
MANIFEST_SUFFIX = ".manifest.json"
STEP_TAGS = ("oracle", "first", "wrong", "correction", "final", "absent", "policy")


class RecordError(ValueError):
    """Bytes that are not a trajectory record (or of an unknown version)."""


def encode_png(image: np.ndarray) -> bytes:
    """RGB ``uint8 [H, W, 3]`` -> PNG bytes (lossless, so masks and pixels round-trip exactly)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> RGB ``uint8 [H, W, 3]``."""
    with Image.open(io.BytesIO(data)) as handle:
        return np.array(handle.convert("RGB"))


@dataclasses.dataclass
class StepRecord:
    """One assistant turn of a trajectory.

    Attributes:
      index: 0-based turn number.
      kind: ``click``, ``terminate``, or ``invalid`` (a model turn that did not parse; rollouts).
      x, y: normalised click (``None`` for terminate); row, col: its pixel.
      positive: click polarity (``None`` for terminate).
      mask: COCO RLE of the mask *after* this turn (unchanged for terminate).
      iou: IoU of that mask with the ground truth (``None`` without one); score: tool score.
      user: the user turn text shown before this turn (query on turn 0, refinement later).
      reasoning: the ``<think>`` content; action: canonical action text; text: the whole turn.
      answer: the ``<answer>`` content of a terminate.
      loss_weight: weight of this turn's tokens in SFT (0 for a deliberately wrong action).
      tag: where the turn came from (``first``, ``oracle``, ``wrong``, ``correction``, ``final``,
        ``absent``; ``policy`` for model-written turns).
    """

    index: int
    kind: str
    mask: dict[str, Any]
    user: str
    reasoning: str
    action: str
    text: str
    loss_weight: float = 1.0
    x: float | None = None
    y: float | None = None
    row: int | None = None
    col: int | None = None
    positive: bool | None = None
    z: float | None = None  # volume clicks: the normalised slice coordinate
    slice: int | None = None  # volume clicks: the clicked slice
    iou: float | None = None
    score: float | None = None
    answer: str | None = None
    tag: str = "oracle"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class TrajectoryRecord:
    """One episode: image once, ground truth, steps. See the module docstring.

    Attributes:
      record_id: unique within a dataset (the sample id for synthesized data).
      image_png: the original image as PNG bytes (RGB, ``height x width``).
      query, query_style: the first user turn and its style.
      target, modality, source, sample_id: what and where from.
      gt_mask: COCO RLE of the ground truth, or ``None`` (rollouts without labels).
      steps: the turns, the last one normally a terminate.
      answer: the final ``<answer>``; end_reason: why the episode ended.
      final_iou, final_dice: of the last mask (``None`` without ground truth).
      meta: free-form JSON facts (tool, click rule, seed, provenance, ...).
      views: volume records only: ``{"slice": k, "image": i}`` before each step and at the end
        (``len(steps) + 1`` entries), ``i`` indexing ``view_pngs``.
    """

    record_id: str
    image_png: bytes
    height: int
    width: int
    query: str
    target: str
    modality: str
    steps: list[StepRecord]
    gt_mask: dict[str, Any] | None = None
    query_style: str = ""
    source: str = ""
    sample_id: str = ""
    answer: str | None = None
    end_reason: str = ""
    final_iou: float | None = None
    final_dice: float | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    views: list[dict[str, int]] | None = None
    view_pngs: list[bytes] = dataclasses.field(default_factory=list)

    # -- views ---------------------------------------------------------------------------------
    def image(self) -> np.ndarray:
        """The original image, RGB ``uint8 [height, width, 3]``."""
        return decode_png(self.image_png)

    def gt(self) -> np.ndarray | None:
        """The ground truth ``bool [height, width]``, or ``None``."""
        return None if self.gt_mask is None else decode_rle(self.gt_mask)

    def observation_image(self, index: int) -> np.ndarray:
        """The image under the overlay before step ``index``: the original image, or for a volume
        record the slice on view then."""
        if not self.views:
            return self.image()
        return decode_png(self.view_pngs[self.views[index]["image"]])

    def step_image(self, index: int) -> np.ndarray:
        """The image the mask after step ``index`` (``-1``: before step 0) is drawn on: the original,
        or for a volume record the slice on view after that step."""
        return self.observation_image(index + 1) if self.views else self.image()

    def step_mask(self, index: int) -> np.ndarray:
        """The mask after step ``index``; ``-1`` gives the mask before step 0 (empty)."""
        if index < 0:
            return np.zeros((self.height, self.width), dtype=bool)
        return decode_rle(self.steps[index].mask)

    def observation_mask(self, index: int) -> np.ndarray:
        """The mask the policy saw before writing step ``index`` (M_{index})."""
        return self.step_mask(index - 1)

    @property
    def num_clicks(self) -> int:
        return sum(1 for s in self.steps if s.kind == "click")

    @property
    def num_sft_samples(self) -> int:
        """One SFT sample per turn: T clicks + 1 terminate."""
        return len(self.steps)

    # -- bytes ---------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image_png", "view_pngs")}
        data["steps"] = [s.to_dict() for s in self.steps]
        data["view_png_sizes"] = [len(p) for p in self.view_pngs]
        return data

    def to_bytes(self) -> bytes:
        header = json.dumps(self.header(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return MAGIC + struct.pack("<BI", VERSION, len(header)) + header + self.image_png + b"".join(self.view_pngs)

    @classmethod
    def from_bytes(cls, data: bytes) -> "TrajectoryRecord":
        if len(data) < 9 or data[:4] != MAGIC:
            raise RecordError("not a trajectory record (bad magic); was this file written by ibis-jax?")
        version, length = struct.unpack("<BI", data[4:9])
        if version not in READABLE_VERSIONS:
            raise RecordError(f"trajectory record version {version}; this code reads versions {READABLE_VERSIONS}")
        if 9 + length > len(data):
            raise RecordError("trajectory record is truncated")
        header = json.loads(data[9 : 9 + length].decode("utf-8"))
        header["steps"] = [StepRecord.from_dict(s) for s in header["steps"]]
        sizes = header.pop("view_png_sizes", [])
        payload = bytes(data[9 + length :])
        end = len(payload) - sum(sizes)
        if end <= 0:
            raise RecordError("trajectory record is truncated (its view images are missing)")
        views, offset = [], end
        for size in sizes:
            views.append(payload[offset : offset + size])
            offset += size
        names = {f.name for f in dataclasses.fields(cls)} - {"image_png", "view_pngs"}
        return cls(image_png=payload[:end], view_pngs=views, **{k: v for k, v in header.items() if k in names})


# -- files ---------------------------------------------------------------------------------------

def shard_name(index: int, count: int) -> str:
    return SHARD_PATTERN.format(index=index, count=count)


class ShardWriter:
    """Writes one ArrayRecord shard atomically: records go to ``<path>.tmp``; :meth:`commit`
    renames it into place, then writes its manifest entry. Leaving the ``with`` block on an
    exception deletes the temporary file."""

    def __init__(self, path: str | Path):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tmp.unlink(missing_ok=True)
        manifest_path(self.path).unlink(missing_ok=True)  # rewriting: the old entry no longer holds
        # group_size:1 keeps random access cheap (one record per chunk), which grain wants.
        self._writer = ArrayRecordWriter(str(self.tmp), "group_size:1")
        self.count = 0
        self._closed = False

    def write(self, record: TrajectoryRecord | bytes) -> None:
        self._writer.write(record if isinstance(record, bytes) else record.to_bytes())
        self.count += 1

    def _close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True

    def commit(self) -> Path:
        self._close()
        os.replace(self.tmp, self.path)
        write_manifest_entry(self.path, self.count)  # after the file is closed and in place
        return self.path

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # an exception, or no commit(): nothing half-written stays behind
            self.abort()


def to_jsonable(value: Any) -> Any:
    """Config dicts, provenance and numpy scalars -> JSON types (tuples become lists), so a
    ``config.json`` written from a dataclass compares equal when read back."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes JSON through a temporary file and a rename (never a half-written file)."""
    atomic_write_json(path, data)


def shard_paths(directory: str | Path) -> list[Path]:
    """The finished shard files of a dataset folder, in order."""
    return sorted(Path(directory).glob(SHARD_GLOB))


# -- the manifest: which shards are complete -----------------------------------------------------

def manifest_path(shard: str | Path) -> Path:
    """``trajectories-00000-of-00004.array_record`` -> ``trajectories-00000-of-00004.manifest.json``."""
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".array_record") + MANIFEST_SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest_entry(shard: str | Path, records: int) -> dict[str, Any]:
    """Records that ``shard`` (closed, in place) is complete: its record count, size and SHA-256."""
    shard = Path(shard)
    entry = {"file": shard.name, "records": int(records), "bytes": shard.stat().st_size, "sha256": file_sha256(shard)}
    atomic_write_json(manifest_path(shard), entry)
    return entry


def read_manifest_entry(shard: str | Path) -> dict[str, Any] | None:
    """The shard's manifest entry, or ``None`` when it has none (or an unreadable one)."""
    try:
        entry = json.loads(manifest_path(shard).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and {"records", "bytes", "sha256"} <= set(entry) else None


def shard_problem(shard: str | Path, *, checksum: bool = True) -> str | None:
    """Why ``shard`` is not complete (``None``: it is): missing, no manifest entry, or a size or
    checksum that disagrees with the entry. ``checksum=False`` checks the size only (cheap)."""
    shard = Path(shard)
    if not shard.is_file():
        return "missing"
    entry = read_manifest_entry(shard)
    if entry is None:
        return f"no manifest entry ({manifest_path(shard).name}): its write did not finish"
    size = shard.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes but the manifest says {entry['bytes']} (truncated or overwritten)"
    if checksum and file_sha256(shard) != entry["sha256"]:
        return "its SHA-256 differs from the manifest's (corrupt)"
    return None


def shard_is_complete(shard: str | Path) -> bool:
    """True when the shard's manifest entry exists and its size and checksum match."""
    return shard_problem(shard) is None


def _corrupt(shard: str | Path, problem: str) -> DataError:
    return DataError(f"{shard}: corrupt or incomplete shard ({problem}); re-run `ibis-jax synth` with the same "
                     "--out to re-synthesize it, or delete the shard")


class TrajectoryDataSource:
    """Random access to the records of a dataset folder (or explicit shard files).

    Implements grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``), so it
    plugs straight into ``grain.MapDataset.source(...)`` or a ``grain.DataLoader``. With
    ``decode=False`` items are the raw bytes (map :meth:`TrajectoryRecord.from_bytes` later).
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], *, decode: bool = True):
        from ibis_jax.storage import check_path, is_remote

        if isinstance(paths, (str, Path)) and is_remote(check_path(paths, "dataset")):  # never read as a local path
            raise DataError(f"{paths}: a remote dataset is read from a local copy: stage it with "
                            "ibis_jax.data.records.stage_dataset first (the commands do)")
        if isinstance(paths, (str, Path)) and Path(paths).is_dir():
            files = shard_paths(paths)
            if not files:
                raise FileNotFoundError(f"{paths}: no {SHARD_GLOB} files; run `ibis-jax synth --out {paths}` first")
        elif isinstance(paths, (str, Path)) and not Path(paths).exists():
            raise FileNotFoundError(f"{paths}: no such dataset folder or shard file; run `ibis-jax synth --out "
                                    f"{paths}` first")
        else:
            files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        for f in files:  # cheap: a size check against the manifest entry (the checksum is synth's)
            if read_manifest_entry(f) is not None and (problem := shard_problem(f, checksum=False)):
                raise _corrupt(f, problem)
        self.paths = [str(p) for p in files]
        self.decode = decode
        self._counts: list[int] | None = None
        try:
            self._source = _array_record_source(self.paths) if self.paths else None
        except Exception as e:  # Riegeli/ArrayRecord name no file: find the shard that does not open
            raise self._locate_open_error(e) from None

    def _locate_open_error(self, error: Exception) -> Exception:
        for p in self.paths:
            try:
                _array_record_source([p])
            except Exception as e:
                return _corrupt(p, f"does not open as ArrayRecord: {one_line_error(e)}")
        return _corrupt(", ".join(self.paths), one_line_error(error))

    def _shard_of(self, index: int) -> tuple[str, int]:
        """(shard path, index within it) of a global record index."""
        if self._counts is None:
            self._counts = [len(_array_record_source([p])) for p in self.paths]
        for path, count in zip(self.paths, self._counts):
            if index < count:
                return path, index
            index -= count
        return self.paths[-1], index

    def __len__(self) -> int:
        return 0 if self._source is None else len(self._source)

    def __getitem__(self, index: int) -> TrajectoryRecord | bytes:
        if self._source is None:
            raise IndexError(f"index {index} out of range for an empty dataset")
        try:
            data = self._source[index]
            return TrajectoryRecord.from_bytes(data) if self.decode else data
        except IndexError:
            raise
        except Exception as e:  # a record that does not read or decode: name the shard and record
            shard, local = self._shard_of(index)
            raise _corrupt(shard, f"record {local} does not read: {one_line_error(e)}") from None

    def __iter__(self) -> Iterator[TrajectoryRecord | bytes]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TrajectoryDataSource({len(self.paths)} shards, {len(self)} records)"


def _array_record_source(paths: list[str]):
    """ArrayRecord random access (grain's ``ArrayRecordDataSource`` is this class plus counters;
    the plain one opens without importing grain, and so JAX: bad data is named in a second)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    return ArrayRecordDataSource(paths)


def stage_dataset(path: str | os.PathLike) -> str:
    """A dataset folder as a local path: a ``gs://`` one is staged down into the local cache
    (committed datasets only: ``synth`` writes the commit marker after every shard and manifest
    entry) and every shard is checked against its manifest entry's SHA-256; a local one is
    returned as it is."""
    from ibis_jax import storage

    text = storage.check_path(path, "--data")
    if not storage.is_remote(text):
        return text
    local = storage.stage_down(text, what="--data")
    for shard in shard_paths(local):
        if (problem := shard_problem(shard, checksum=True)) is not None:
            raise _corrupt(f"{text}/{shard.name}", problem)
    return local


def check_dataset(path: str | Path) -> int:
    """The number of records of a dataset folder; a missing, empty or corrupt one raises an error
    naming it (cheap: shard sizes against their manifest entries, no record is decoded)."""
    count = len(TrajectoryDataSource(path))
    if count == 0:
        raise DataError(f"{path}: the dataset has no records; re-run `ibis-jax synth --out {path}`")
    return count


def one_line_error(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_records(path: str | Path) -> list[TrajectoryRecord]:
    """All records of one shard file or a dataset folder, in order."""
    return list(TrajectoryDataSource(path))
