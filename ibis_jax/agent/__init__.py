"""The agent: action grammar, the episode state machine, observations, the oracle policy."""

from ibis_jax.agent.episode import END_REASONS, Episode, EpisodeConfig, Step
from ibis_jax.agent.grammar import (
    Action,
    ActionParseError,
    Click,
    ParsedTurn,
    Terminate,
    format_action,
    format_turn,
    parse_turn,
)
from ibis_jax.agent.overlay import draw_clicks, render_overlay

__all__ = [
    "END_REASONS", "Action", "ActionParseError", "Click", "Episode", "EpisodeConfig", "ParsedTurn",
    "Step", "Terminate", "draw_clicks", "format_action", "format_turn", "parse_turn", "render_overlay",
]
