"""todsynth: task-oriented synthesis of remote-sensing segmentation training data.

Stages: (a) a mask-controlled MM-DiT generator, (b) CRFM sampling of new image/label pairs,
(c) a segmenter trained on real + synthetic data. Heavy libraries load lazily, per stage.
"""

__version__ = "0.1.0"
