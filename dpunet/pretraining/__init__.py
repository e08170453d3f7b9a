"""Public pretraining: the planned network trained on images of random processes, for DP fine-tuning."""
