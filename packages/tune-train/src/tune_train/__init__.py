"""tune-train: config system, the full_finetune recipe (single device and FSDP2), metric
loggers, checkpoints with exact resume.

Submodules are imported on use (``tune_train.config`` needs no torch), so this file stays light.
"""

__version__ = "0.1.0"
