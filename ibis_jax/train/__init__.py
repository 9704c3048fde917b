"""Training: SFT samples and pipeline, mesh, train state, the shared update step, checkpoints.

What GRPO reuses: `state.TrainState` / `ModelDef` / `init_fn_for` / `state_specs`,
`optim.make_optimizer`, `step.make_train_step(model_def, loss_fn, tx, schedule)` +
`step.jit_train_step`, `checkpoint.Checkpointer`, `metrics.MetricsWriter`, `mesh.make_mesh`.
"""
