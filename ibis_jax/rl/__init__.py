"""Reinforcement learning: rewards over finished episodes, GRPO advantages and losses."""
