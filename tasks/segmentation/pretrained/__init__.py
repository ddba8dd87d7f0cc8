"""Pretrained weights shipped with the segmentation task (small enough for the package).

``tiny_teacher.safetensors``: the tiny preset's teacher (``configs/tiny/teacher.yaml``),
stored in float16, made by ``scripts/make_tiny_teacher.sh segmentation``;
``tiny_teacher.json`` records the command, seed, training time and test metrics of the run
that produced it. Refer to it in a config as
``tasks.segmentation.pretrained:tiny_teacher.safetensors``.
"""
