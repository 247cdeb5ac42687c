"""Training: the checked config, train state, optimizers, schedules, steps and the trainer."""
