"""The releasable model file: what a data owner may share after a DP training run (see model_file)."""
from dpunet.release.model_file import (CHECKPOINT_FILE, MODEL_FILE, PRIVATE_FOLDER, RELEASE_FOLDER, ReleasedModel,
                                       assert_releasable, load_release, network_from_release, private_folder,
                                       release_folder, write_release)

__all__ = ["CHECKPOINT_FILE", "MODEL_FILE", "PRIVATE_FOLDER", "RELEASE_FOLDER", "private_folder", "ReleasedModel", "assert_releasable", "load_release",
           "network_from_release", "release_folder", "write_release"]
