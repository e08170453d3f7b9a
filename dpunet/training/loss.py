"""The loss moved to dpunet.learning.loss (pretraining uses it too); this name keeps older imports working."""
from dpunet.learning.loss import SegmentationLoss, deep_supervision_weights, downsample_seg_for_deep_supervision  # noqa: F401
