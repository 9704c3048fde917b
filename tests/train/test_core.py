"""Launch flags of the trainer core: validated before anything starts; alone, nothing starts."""

import jax
import pytest

from ibis_jax.train import core


def test_distributed_flags_go_together_and_alone_is_a_no_op():
    with pytest.raises(ValueError, match="go together"):
        core.init_distributed("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match="outside 0..1"):
        core.init_distributed("127.0.0.1:1234", 2, 2)
    core.init_distributed("127.0.0.1:1234", 1, 0)  # one process: nothing to coordinate
    core.init_distributed()  # no cluster here: one process
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()
    assert core.global_max(7) == 7
    preemption = core.Preemption()
    try:
        assert not preemption.requested()
    finally:
        preemption.close()


def test_cli_takes_the_launch_flags():
    from ibis_jax.cli import build_parser

    for cmd in (["sft", "--config", "c.py", "--data", "d", "--workdir", "w"],
                ["grpo", "--config", "c.py", "--init", "i", "--workdir", "w"]):
        argv = [*cmd, "--coordinator", "10.0.0.1:12355", "--num-processes", "2", "--process-id", "1", "lr=1e-6"]
        args = build_parser(argv).parse_args(argv)
        assert (args.coordinator, args.num_processes, args.process_id, args.overrides) == (
            "10.0.0.1:12355", 2, 1, ["lr=1e-6"])


def test_process_slices_cover_every_item_once_in_order():
    import numpy as np

    for n, count in [(6, 2), (7, 3), (3, 3), (5, 1), (2, 4)]:
        shares = [core.process_slice(n, p, count) for p in range(count)]
        assert [i for s in shares for i in range(n)[s]] == list(range(n))
        sizes = [s.stop - s.start for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert core.process_slice(6) == slice(0, 6)  # alone: everything
    with pytest.raises(ValueError, match="outside 0..1"):
        core.process_slice(4, 2, 2)
    rows = np.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(core.gather_rows(rows, 6), rows)  # alone: the rows themselves
    assert core.local_replica({"a": 1}, None, None) == {"a": 1}


def test_checkpoints_through_epath_and_remote_workdirs_refused(tmp_path, monkeypatch):
    """A relative local workdir (the tested default) saves and restores through etils.epath; a
    corrupt newest step is set aside; a gs:// workdir given to a trainer function (not through the
    commands, which train in its local spool) is refused in one line before any work."""
    import jax.numpy as jnp
    import numpy as np

    from ibis_jax.errors import UserError
    from ibis_jax.fileio import as_path, local_workdir
    from ibis_jax.rl.trainer import RLConfig, train_grpo
    from ibis_jax.train.checkpoint import Checkpointer
    from ibis_jax.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("run", keep=3)
    assert str(ckpt.directory) == str(tmp_path / "run" / "checkpoints")
    state = {"w": jnp.arange(4.0)}
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step}, {"step": step}, {"lr": 1.0})
    ckpt.wait()  # saves are asynchronous
    for f in (tmp_path / "run" / "checkpoints" / "2").rglob("*"):  # corrupt step 2
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(b"x")
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    restored, data, config, step = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 1 and data == {"step": 1} and config == {"lr": 1.0}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / "checkpoints-unrestorable").iterdir()] == ["2"]
    assert str(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    with pytest.raises(UserError, match="gs://bucket/run: train in a local spool of it"):
        local_workdir("gs://bucket/run")
    with pytest.raises(UserError, match="local spool"):
        train_grpo(TrainConfig(), RLConfig(), [object()], None, "gs://bucket/run", init_dir="unused")
