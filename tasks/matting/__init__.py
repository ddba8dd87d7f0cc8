"""The matting reference task: Deep Image Matting teacher and student, data, losses,
metrics (see docs/matting.md)."""
