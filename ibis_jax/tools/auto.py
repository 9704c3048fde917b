"""``--tool auto``: the classical tool's preset chosen per episode from the sample's target.

The random walker needs an edge around its target; tissue-class targets (white or grey matter, all
nuclei of a microscopy tile) have none, and get the ``classical-tissue`` preset (the seeds' colour
model); objects get the plain one (on the synthetic shapes the tissue preset falls to mIoU@20 0.28).
With the wrong preset the demo's MRI trajectories end at mean IoU 0.59 after 20 clicks.

The :class:`AutoTool` is a ``SegmentationTool`` and a ``VolumeSegmentationTool`` (an episode opened
with a spacing is a volume and goes to the 3D presets); whoever knows the sample (synthesis,
evaluation, ``segment``) calls :func:`assign_episode` before the episode opens.
"""

from __future__ import annotations

import numpy as np

TISSUE_WORDS = ("matter", "nucle", "cell", "tissue", "parenchyma", "cortex")
TISSUE_MODALITIES = ("Microscopy",)


def classical_preset(modality: str, target: str) -> str:
    """``classical-tissue`` for tissue-class targets and modalities, ``classical`` for the rest."""
    words = target.lower()
    if modality in TISSUE_MODALITIES or any(w in words for w in TISSUE_WORDS):
        return "classical-tissue"
    return "classical"


class AutoTool:
    """Routes each episode to the classical preset :func:`classical_preset` names for it
    (an unassigned episode gets the object preset)."""

    def __init__(self):
        from ibis_jax.tools.classical import TISSUE, ClassicalTool, ClassicalToolConfig

        self.tools = {"classical": ClassicalTool(ClassicalToolConfig()), "classical-tissue": ClassicalTool(TISSUE)}
        self._volume_tools: dict[str, object] = {}  # built on the first volume
        self._route: dict[str, str] = {}
        self._volumes: dict[str, object] = {}  # open volume episodes -> their 3D tool

    def assign(self, episode_id: str, modality: str, target: str) -> str:
        self._route[episode_id] = classical_preset(modality, target)
        return self._route[episode_id]

    def _tool(self, episode_id: str):
        if episode_id in self._volumes:
            return self._volumes[episode_id]
        return self.tools[self._route.get(episode_id, "classical")]

    def _volume_tool(self, preset: str):
        if not self._volume_tools:
            from ibis_jax.tools.volume import TISSUE_3D, ClassicalVolumeTool, ClassicalVolumeToolConfig

            self._volume_tools = {"classical": ClassicalVolumeTool(ClassicalVolumeToolConfig()),
                                  "classical-tissue": ClassicalVolumeTool(TISSUE_3D)}
        return self._volume_tools[preset]

    def open(self, episode_id: str, image: np.ndarray, spacing=None) -> None:
        if spacing is not None:  # a volume (VolumeSegmentationTool.open)
            tool = self._volume_tool(self._route.get(episode_id, "classical"))
            tool.open(episode_id, image, spacing)
            self._volumes[episode_id] = tool
            return
        self._tool(episode_id).open(episode_id, image)

    def segment(self, episode_id: str, points: np.ndarray, labels: np.ndarray, prev_logits=None):
        return self._tool(episode_id).segment(episode_id, points, labels, prev_logits)

    def close(self, episode_id: str) -> None:
        self._tool(episode_id).close(episode_id)
        self._route.pop(episode_id, None)
        self._volumes.pop(episode_id, None)


def assign_episode(tool, episode_id: str, modality: str, target: str) -> None:
    """Tells a routing tool (one with ``assign``) which sample an episode is; others ignore it."""
    assign = getattr(tool, "assign", None)
    if assign is not None:
        assign(episode_id, modality, target)
