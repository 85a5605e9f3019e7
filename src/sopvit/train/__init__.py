"""The pre-training loop: ``Trainer`` (build from a config, resume, fit), the step, its schedules, the
monitor and the online k-NN."""
