"""Sliding-window prediction and export of segmentations in the input's original geometry."""
