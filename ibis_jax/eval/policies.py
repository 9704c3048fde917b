"""Policies by name, as ``eval`` and ``segment`` take them: ``oracle`` or a model directory."""

from __future__ import annotations

from pathlib import Path

from ibis_jax.agent.loop import Policy
from ibis_jax.agent.oracle import OraclePolicy
from ibis_jax.data.clicks import ClickRule


class PolicyUnavailable(RuntimeError):
    """The named policy cannot be loaded in this installation."""


def is_oracle(spec: str) -> bool:
    return spec.strip().lower() == "oracle"


def load_policy(
    spec: str, *, rule: ClickRule = "ritm", stop_iou: float | None = 0.9, max_clicks: int = 20,
    volume_clicker: str = "3d",
) -> Policy:
    """``oracle`` (the click simulator; reads the ground truth) or a checkpoint / HF directory.

    ``rule``, ``stop_iou``, ``max_clicks`` and ``volume_clicker`` configure the oracle only; a model
    decides itself.
    """
    if is_oracle(spec):
        return OraclePolicy(rule=rule, stop_iou=stop_iou, max_clicks=max_clicks, volume_clicker=volume_clicker)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec!r}: no such checkpoint or model directory (or use 'oracle')")
    if (path / "config.json").is_file():  # a torn export is named before JAX is imported
        from ibis_jax.fileio import read_json

        read_json(path / "config.json", "model config (config.json)")
    try:
        from ibis_jax.generate.policy import ModelPolicy
    except ImportError as e:
        raise PolicyUnavailable(
            f"{spec}: model policy not available yet (ibis_jax.generate.policy does not import: {e}); "
            "use the oracle ('oracle', which needs ground-truth masks) until the model policy lands"
        ) from None
    from ibis_jax.errors import DataError, UserError

    try:
        return ModelPolicy.from_pretrained_dir(str(path))
    except (UserError, FileNotFoundError):  # already name the file
        raise
    except Exception as e:  # a torn or foreign model directory: name it (--debug: the traceback)
        raise DataError(f"{spec}: cannot load the model directory ({type(e).__name__}: {' '.join(str(e).split())}); "
                        "re-export it (rerun the training command) or pick another --policy/--model") from None
