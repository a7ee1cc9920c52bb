"""The training loop: config, schedules, optimizers, EMA, eval, checkpoints, logging."""
