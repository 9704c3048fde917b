"""Requests off the wire, checked before any work: episode ids, images (bytes, or a path read only
under ``--image-root``), clicks, volumes (the header before anything is inflated), and the RLE
mask message replies carry. Every refusal is an ``Abort`` naming the field and the fix."""

from __future__ import annotations

import asyncio
import os
import warnings
import zlib
from typing import Any, Callable

import grpc
import numpy as np

from ibis_jax.data.rle import encode_rle
from ibis_jax.tools.protocol import ToolError, validate_image, validate_prompt
from ibis_jax.tools.volume import validate_volume, validate_volume_prompt
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.server.config import MAX_EPISODE_ID_CHARS, ServerConfig
from tool_bridge.server.status import Abort, invalid


def rle_message(mask: np.ndarray) -> pb.Rle:
    rle = encode_rle(mask)
    return pb.Rle(size=rle["size"], counts=rle["counts"])


def _validated(check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)`` (one of the tool protocol's validators), its ``ToolError`` as INVALID_ARGUMENT."""
    try:
        return check(*args)
    except ToolError as error:
        raise invalid(str(error)) from error


class RequestParser:
    """The checks of one server's limits (``ServerConfig``) on what clients send."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.root = os.path.realpath(config.image_root) if config.image_root else None

    def episode_id(self, episode_id: str) -> str:
        if not episode_id or len(episode_id) > MAX_EPISODE_ID_CHARS:
            raise invalid(f"episode_id must be 1..{MAX_EPISODE_ID_CHARS} characters, got {len(episode_id)}")
        return episode_id

    # ---- images ----------------------------------------------------------------------------

    async def image(self, request: Any) -> np.ndarray:
        """The RGB image of an ``OpenEpisode``/``Segment`` request: its bytes, or a file under the root."""
        source = request.WhichOneof("source")
        if source == "image":
            image = self._image_bytes(request.image)
        elif source == "path":
            image = await asyncio.to_thread(self.read_path, request.path)
        else:
            raise invalid("set image or path (the source oneof)")
        return _validated(validate_image, image)

    def _image_bytes(self, msg: pb.Image) -> np.ndarray:
        height, width = int(msg.height), int(msg.width)
        side = self.config.max_image_side
        if not (2 <= height <= side and 2 <= width <= side):
            raise invalid(f"image.height/width {height}x{width} outside 2..{side} (server --max-image-side)")
        if len(msg.data) != height * width * 3:
            raise invalid(f"image.data has {len(msg.data)} bytes, expected height*width*3 = "
                          f"{height * width * 3} (RGB uint8, row-major)")
        # A private writable copy: torch warns on (and must not alias) the read-only request buffer.
        return np.frombuffer(msg.data, dtype=np.uint8).reshape(height, width, 3).copy()

    def confine(self, path: str) -> str:
        """The real path of ``path`` under the image root; refuses anything outside it or not a file."""
        if self.root is None:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        "this server reads no files; start it with --image-root DIR or send image bytes")
        if not path or "\0" in path or len(path) > self.config.max_path_chars:
            raise invalid(f"path must be 1..{self.config.max_path_chars} characters without NUL bytes, got "
                          f"{len(path)} characters{' with a NUL byte' if chr(0) in path else ''}")
        try:
            full = os.path.realpath(os.path.join(self.root, path))
            inside = os.path.commonpath([self.root, full]) == self.root
            is_file = inside and os.path.isfile(full)
        except (ValueError, OSError) as error:  # undecodable, too long for the OS, ...
            raise invalid(f"path {path[:200]!r} is not a usable path: {error}")
        if not inside:
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, f"path {path!r} lies outside the image root")
        if not is_file:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"path {path!r} is not a file under the image root")
        return full

    def read_path(self, path: str) -> np.ndarray:
        """Reads an image file under the root, checking its size from the header before decoding."""
        full = self.confine(path)
        from PIL import Image

        side = self.config.max_image_side
        try:
            if full.endswith(".npy"):
                header = np.load(full, mmap_mode="r", allow_pickle=False)  # reads the header only
                self.check_side(path, tuple(header.shape))
                image = np.array(header)
            else:
                with warnings.catch_warnings():  # our own size check below comes first
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(full) as handle:  # lazy: the header gives the size, nothing decoded
                        self.check_side(path, (handle.height, handle.width))
                        image = np.asarray(handle.convert("RGB"))
        except Abort:
            raise
        except Image.DecompressionBombError as error:  # over 2x PIL's pixel limit: refused in open()
            raise invalid(f"path {path!r}: image too large (max side {side}, --max-image-side): {error}")
        except Exception as error:  # noqa: BLE001 - any decoder error is the file's fault
            raise invalid(f"path {path!r}: cannot read image: {error}")
        self.check_side(path, image.shape)
        return image

    def check_side(self, path: str, shape: tuple[int, ...]) -> None:
        side = self.config.max_image_side
        if len(shape) < 2 or max(shape[:2]) > side:
            raise invalid(f"path {path!r}: image {shape} too large (max side {side}, --max-image-side)")

    # ---- clicks ----------------------------------------------------------------------------

    def _click_arrays(self, clicks: Any, axes: str) -> tuple[np.ndarray, np.ndarray]:
        """``clicks.points`` as ``[n, len(axes)]`` float32 and the labels, counts checked."""
        if len(clicks.points) != len(axes) * len(clicks.labels):
            raise invalid(f"clicks.points has {len(clicks.points)} floats for {len(clicks.labels)} labels; "
                          f"send {','.join(axes)} per label")
        if len(clicks.labels) > self.config.max_clicks:
            raise invalid(f"{len(clicks.labels)} clicks exceed the server's --max-clicks {self.config.max_clicks}")
        points = np.asarray(clicks.points, dtype=np.float32).reshape(-1, len(axes))
        return points, np.asarray(clicks.labels, dtype=np.int32)

    def clicks(self, clicks: pb.Clicks, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        points, labels = self._click_arrays(clicks, "xy")
        return _validated(validate_prompt, points, labels, height, width)

    def volume_clicks(self, clicks: pb.VolumeClicks, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        points, labels = self._click_arrays(clicks, "xyz")
        return _validated(validate_volume_prompt, points, labels, shape)

    # ---- volumes ---------------------------------------------------------------------------

    def volume(self, msg: pb.Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Checks the header (sizes, spacing, compression) before decoding anything, then decodes."""
        d, h, w = int(msg.depth), int(msg.height), int(msg.width)
        side, cap = self.config.max_image_side, self.config.max_volume_voxels
        if not all(2 <= n <= side for n in (d, h, w)):
            raise invalid(f"volume.depth/height/width {d}x{h}x{w}: each must be 2..{side} (server --max-image-side)")
        voxels = d * h * w
        if voxels > cap:
            raise invalid(f"volume {d}x{h}x{w} has {voxels} voxels, over the server's --max-volume-mvoxels "
                          f"({cap / 2**20:g} Mi voxels)")
        spacing = tuple(msg.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise invalid(f"volume.spacing must be three positive mm values (depth, height, width), got {list(spacing)}")
        data = _volume_bytes(msg, voxels)
        if len(data) != voxels:
            raise invalid(f"volume.data has {len(data)} bytes, expected depth*height*width = {voxels} "
                          "(uint8, row-major [depth, height, width])")
        volume = np.frombuffer(data, dtype=np.uint8).reshape(d, h, w).copy()
        return _validated(validate_volume, volume, spacing)


def _volume_bytes(msg: pb.Volume, voxels: int) -> bytes:
    """``msg.data`` as sent or inflated, never past ``voxels`` bytes (a zip bomb stops there)."""
    if msg.compression == pb.COMPRESSION_NONE:
        return msg.data
    if msg.compression != pb.COMPRESSION_ZLIB:
        raise invalid(f"volume.compression {msg.compression} is unknown")
    decoder = zlib.decompressobj()
    try:
        data = decoder.decompress(msg.data, voxels + 1)  # never inflates past the header's size
    except zlib.error as error:
        raise invalid(f"volume.data is not valid zlib data: {error}")
    if len(data) != voxels or not decoder.eof or decoder.unconsumed_tail:
        raise invalid(f"volume.data (zlib) does not decode to exactly depth*height*width = {voxels} bytes")
    return data
