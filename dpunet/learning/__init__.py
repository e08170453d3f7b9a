"""What pretraining and training both use: the segmentation loss, the optimiser and learning-rate schedule, and
checkpoint files. It sits below both, so that training may call pretraining without either importing the other."""
