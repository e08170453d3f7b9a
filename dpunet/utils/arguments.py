"""Argument types shared by several commands (kept out of the *.cli modules, which nothing imports)."""
from __future__ import annotations

import argparse
import math


def parse_epsilon(text: str) -> float:
    """A positive epsilon, or 'inf' for non-private runs (argparse type)."""
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"epsilon must be positive or 'inf', got {text}")
    return value
