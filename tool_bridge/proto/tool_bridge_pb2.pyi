from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZLIB: _ClassVar[Compression]

class Probability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROBABILITY_NONE: _ClassVar[Probability]
    PROBABILITY_FLOAT32: _ClassVar[Probability]
    PROBABILITY_UINT8: _ClassVar[Probability]
COMPRESSION_NONE: Compression
COMPRESSION_ZLIB: Compression
PROBABILITY_NONE: Probability
PROBABILITY_FLOAT32: Probability
PROBABILITY_UINT8: Probability

class Image(_message.Message):
    __slots__ = ("data", "height", "width")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Rle(_message.Message):
    __slots__ = ("size", "counts")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    size: _containers.RepeatedScalarFieldContainer[int]
    counts: str
    def __init__(self, size: _Optional[_Iterable[int]] = ..., counts: _Optional[str] = ...) -> None: ...

class Clicks(_message.Message):
    __slots__ = ("points", "labels")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, points: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenEpisodeRequest(_message.Message):
    __slots__ = ("episode_id", "image", "path")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    image: Image
    path: str
    def __init__(self, episode_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., path: _Optional[str] = ...) -> None: ...

class OpenEpisodeReply(_message.Message):
    __slots__ = ("height", "width", "next_step")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    next_step: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., next_step: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("episode_id", "step_index", "clicks")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    step_index: int
    clicks: Clicks
    def __init__(self, episode_id: _Optional[str] = ..., step_index: _Optional[int] = ..., clicks: _Optional[_Union[Clicks, _Mapping]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("mask", "score", "step_index")
    MASK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    mask: Rle
    score: float
    step_index: int
    def __init__(self, mask: _Optional[_Union[Rle, _Mapping]] = ..., score: _Optional[float] = ..., step_index: _Optional[int] = ...) -> None: ...

class CloseEpisodeRequest(_message.Message):
    __slots__ = ("episode_id",)
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    def __init__(self, episode_id: _Optional[str] = ...) -> None: ...

class CloseEpisodeReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class Logits(_message.Message):
    __slots__ = ("data", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image", "path", "clicks", "prev_logits")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    PREV_LOGITS_FIELD_NUMBER: _ClassVar[int]
    image: Image
    path: str
    clicks: Clicks
    prev_logits: Logits
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., path: _Optional[str] = ..., clicks: _Optional[_Union[Clicks, _Mapping]] = ..., prev_logits: _Optional[_Union[Logits, _Mapping]] = ...) -> None: ...

class SegmentReply(_message.Message):
    __slots__ = ("mask", "score", "logits")
    MASK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    mask: Rle
    score: float
    logits: Logits
    def __init__(self, mask: _Optional[_Union[Rle, _Mapping]] = ..., score: _Optional[float] = ..., logits: _Optional[_Union[Logits, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("backend", "checkpoint_sha256", "image_size", "device", "version", "max_clicks", "max_image_side", "max_batch", "open_episodes", "cache_bytes", "volume_backend", "max_volume_voxels")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CLICKS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    OPEN_EPISODES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUME_BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_VOLUME_VOXELS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    checkpoint_sha256: str
    image_size: int
    device: str
    version: str
    max_clicks: int
    max_image_side: int
    max_batch: int
    open_episodes: int
    cache_bytes: int
    volume_backend: str
    max_volume_voxels: int
    def __init__(self, backend: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., image_size: _Optional[int] = ..., device: _Optional[str] = ..., version: _Optional[str] = ..., max_clicks: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_batch: _Optional[int] = ..., open_episodes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., volume_backend: _Optional[str] = ..., max_volume_voxels: _Optional[int] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("data", "depth", "height", "width", "spacing", "compression")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SPACING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    depth: int
    height: int
    width: int
    spacing: _containers.RepeatedScalarFieldContainer[float]
    compression: Compression
    def __init__(self, data: _Optional[bytes] = ..., depth: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., spacing: _Optional[_Iterable[float]] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class VolumeClicks(_message.Message):
    __slots__ = ("points", "labels")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, points: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenVolumeRequest(_message.Message):
    __slots__ = ("episode_id", "volume")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    volume: Volume
    def __init__(self, episode_id: _Optional[str] = ..., volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class OpenVolumeReply(_message.Message):
    __slots__ = ("depth", "height", "width", "next_step")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    depth: int
    height: int
    width: int
    next_step: int
    def __init__(self, depth: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., next_step: _Optional[int] = ...) -> None: ...

class VolumeStepRequest(_message.Message):
    __slots__ = ("episode_id", "step_index", "clicks", "probability")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    step_index: int
    clicks: VolumeClicks
    probability: Probability
    def __init__(self, episode_id: _Optional[str] = ..., step_index: _Optional[int] = ..., clicks: _Optional[_Union[VolumeClicks, _Mapping]] = ..., probability: _Optional[_Union[Probability, str]] = ...) -> None: ...

class Array(_message.Message):
    __slots__ = ("data", "shape", "dtype", "compression")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    compression: Compression
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class VolumeStepReply(_message.Message):
    __slots__ = ("slices", "score", "step_index", "probability")
    SLICES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    slices: _containers.RepeatedCompositeFieldContainer[Rle]
    score: float
    step_index: int
    probability: Array
    def __init__(self, slices: _Optional[_Iterable[_Union[Rle, _Mapping]]] = ..., score: _Optional[float] = ..., step_index: _Optional[int] = ..., probability: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...
