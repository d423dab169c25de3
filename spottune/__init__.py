"""SpotTune: transfer learning through adaptive fine-tuning (Guo et al., CVPR 2019).

The package is a plain library: importing it loads no torch, no orchestration framework and
reads no files. Entry points live in `spottune.cli`.
"""

__version__ = "0.1.0"
