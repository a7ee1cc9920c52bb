"""The MPL algorithm as plain objects: pseudo labels, losses, feedback estimators, the step,
Reduced MPL. No I/O, no logging, no argument parsing."""
from mpl_fast.mpl.bn import frozen_bn_stats
from mpl_fast.mpl.config import PRESETS, MPLConfig, preset
from mpl_fast.mpl.feedback import MovingBaseline
from mpl_fast.mpl.step import MPLBatch, MPLStep

__all__ = ["MPLConfig", "PRESETS", "preset", "MPLStep", "MPLBatch", "MovingBaseline",
           "frozen_bn_stats"]
