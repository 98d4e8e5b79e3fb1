"""The loops: training (``train``), sampling to disk (``sampling``), evaluation (``evaluate``), checkpoints."""
