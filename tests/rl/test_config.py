"""GRPO settings as typed config files, every field overridable by dotted name."""

import dataclasses
from pathlib import Path

import pytest

from ibis_jax.commands.grpo import rl_config_from
from ibis_jax.rl.trainer import RLConfig
from ibis_jax.train.config import TrainConfig, apply_dotted_overrides, apply_overrides, field_names, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _written(value) -> str:
    """How a value is written on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, tuple):
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("root, prefix", [(RLConfig(), "rl."), (TrainConfig(), "")])
def test_every_field_round_trips_through_its_command_line_spelling(root, prefix):
    names = field_names(root)
    assert "grpo.epsilon_high" in names or prefix == ""
    for name in names:
        value = _get(root, name)
        again = apply_dotted_overrides(root, [f"{prefix}{name}={_written(value)}"], prefix=prefix)
        assert _get(again, name) == value, name


def test_dotted_nested_overrides_and_short_names():
    rl = rl_config_from(["rl.grpo.epsilon_high=0.28", "rl.group_size=8", "rl.reward_mode=step", "rl.steps=3",
                         "rl.reward.weights=format:1,answer:2", "rl.grpo.beta=0.04", "rl.rewards=format,answer"])
    assert rl.grpo.epsilon_high == 0.28 and rl.grpo.group_size == 8 and rl.reward.mode == "step"
    assert rl.steps == 3 and rl.reward.weights == {"format": 1.0, "answer": 2.0} and rl.grpo.beta == 0.04
    assert rl.rewards == ("format", "answer")
    assert rl.grpo.epsilon_low == 0.2 and rl.reward.t_opt == RLConfig().reward.t_opt  # the rest untouched


def test_unknown_and_ill_typed_overrides_name_field_type_and_nearest():
    with pytest.raises(ValueError, match=r"no field 'rl.grpo.epsilon_hgh' in RLConfig; nearest: rl.grpo.epsilon_high"):
        rl_config_from(["rl.grpo.epsilon_hgh=0.28"])
    with pytest.raises(ValueError, match=r"rl.epsilon_hi.*nearest: rl.grpo.epsilon_high"):
        rl_config_from(["rl.epsilon_hi=0.28"])
    with pytest.raises(ValueError, match=r"field rl.grpo.epsilon_high has type float \| None: could not convert"):
        rl_config_from(["rl.grpo.epsilon_high=high"])
    with pytest.raises(ValueError, match=r"rl.reward.mode has type Literal\['multi_turn', 'step'\].*'stp'"):
        rl_config_from(["rl.reward.mode=stp"])
    with pytest.raises(ValueError, match=r"rl.grpo.advantage=ppo: GRPOConfig.advantage='ppo': choose one of"):
        rl_config_from(["rl.grpo.advantage=ppo"])
    with pytest.raises(ValueError, match=r"no field 'lrr' in TrainConfig; nearest: lr"):
        apply_overrides(TrainConfig(), ["lrr=1e-4"])
    with pytest.raises(ValueError, match=r"field batch_size has type int"):
        apply_overrides(TrainConfig(), ["batch_size=many"])


def test_grpo_config_file_and_every_config_loads():
    rl = rl_config_from(["rl.steps=2"], str(CONFIGS / "grpo_tiny_cpu.py"))
    assert rl.steps == 2 and rl.prompts_per_step == 4 and rl.temperature == 0.7 and rl.reward.t_opt == 3
    train = load_config(CONFIGS / "grpo_tiny_cpu.py", ["lr=3e-4"])
    assert train.lr == 3e-4 and train.system_prompt == "short" and train.image_size == 112
    for path in sorted(CONFIGS.glob("*.py")):
        assert isinstance(load_config(path), TrainConfig), path
    assert rl_config_from([], str(CONFIGS / "tiny_cpu.py")) == RLConfig()  # no get_rl_config: the defaults
    assert dataclasses.is_dataclass(rl.grpo)


def test_every_shipped_config_loads_with_its_rl_settings():
    """Each configs/*.py builds its TrainConfig, and a GRPO config its RLConfig (a renamed field
    would otherwise surface only on a rented machine). GRPO configs keep their SFT config's model,
    precision and image size, which the run's init model was trained with."""
    import glob

    from ibis_jax.commands.grpo import rl_config_from
    from ibis_jax.train.config import load_config

    paths = sorted(glob.glob("configs/*.py"))
    assert len(paths) >= 6
    for path in paths:
        config = load_config(path, [])
        rl = rl_config_from([], path)
        assert rl.grpo.group_size >= 2, path
        sft = path.replace("_grpo.py", ".py")
        if path.endswith("_grpo.py") and sft in paths:
            base = load_config(sft, [])
            assert (config.model, config.param_dtype, config.image_size, config.lora_rank, config.grad_accum) == (
                base.model, base.param_dtype, base.image_size, base.lora_rank, 1), path
