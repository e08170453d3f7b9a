"""Training: the DP-safe loss, trainers and their schedules."""
