"""What a policy was trained to see, recorded with every exported model.

A model only works with the conversation it was trained on: the system prompt, the square image
size every observation is resized to, the overlay's colour and alpha, and the history mode. SFT
and GRPO write these into the export (``ibis_agent.json``); evaluation, ``segment`` and GRPO read
them back, so inference never quietly differs from training. A directory without the file (a
Hugging Face checkpoint that did not come from our trainers) gets :data:`HF_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ibis_jax.agent.conversation import HISTORY_MODES
from ibis_jax.agent.overlay import DEFAULT_ALPHA, DEFAULT_COLOR
from ibis_jax.agent.prompts import system_prompt
from ibis_jax.fileio import atomic_write_text

AGENT_FILE = "ibis_agent.json"


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """system_prompt: a name in ``agent.prompts.SYSTEM_PROMPTS``; image_size: square side every
    image is resized to (multiple of 28, or of 32 for Qwen3-VL; docs/design.md section 5: 504 px = 324 visual tokens for the 512 px cap)."""

    system_prompt: str = "full"
    image_size: int = 504
    overlay_color: tuple[int, int, int] = DEFAULT_COLOR
    overlay_alpha: float = DEFAULT_ALPHA
    history: str = "none"

    def __post_init__(self):
        system_prompt(self.system_prompt)
        if self.image_size <= 0 or (self.image_size % 28 and self.image_size % 32):
            raise ValueError(f"image_size {self.image_size}: a positive multiple of 28 (Qwen2.5-VL: 14 px patches, "
                             "2x2 merge) or 32 (Qwen3-VL: 16 px patches)")
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history {self.history!r}: choose from {HISTORY_MODES}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha {self.overlay_alpha}: must be in [0, 1]")
        object.__setattr__(self, "overlay_color", tuple(int(c) for c in self.overlay_color))

    @property
    def system_text(self) -> str:
        return system_prompt(self.system_prompt)

    @classmethod
    def from_train_config(cls, config) -> "AgentSettings":
        return cls(config.system_prompt, config.image_size, tuple(config.overlay_color), config.overlay_alpha,
                   config.history)


HF_DEFAULTS = AgentSettings()


def settings_json(settings: AgentSettings) -> str:
    """The text of ``AGENT_FILE``."""
    return json.dumps(dataclasses.asdict(settings), indent=2) + "\n"


def save_agent_settings(directory: str | os.PathLike, settings: AgentSettings) -> None:
    """Writes ``AGENT_FILE`` into a model directory (atomically: a temp file, then a rename)."""
    atomic_write_text(Path(directory) / AGENT_FILE, settings_json(settings))


def load_agent_settings(directory: str | os.PathLike) -> AgentSettings:
    """The settings recorded in a model directory; :data:`HF_DEFAULTS` when none are. Fields the
    file lacks (older exports recorded only the system prompt) take the defaults."""
    path = Path(directory) / AGENT_FILE
    if not path.exists():
        return HF_DEFAULTS
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        known = {f.name for f in dataclasses.fields(AgentSettings)}
        return AgentSettings(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not valid agent settings ({e}); expected a JSON object with "
                         f"{sorted(f.name for f in dataclasses.fields(AgentSettings))}: rewrite it, or delete it "
                         "for the Hugging Face defaults") from None
