"""kdkit: knowledge distillation for dense prediction.

Record features by module name (:mod:`kdkit.capture`), map student features to teacher
shape (:mod:`kdkit.adapters`), compare them with a distillation loss (:mod:`kdkit.losses`),
and combine weighted terms with a frozen teacher (:class:`Distiller`).
"""

from kdkit.distiller import Distiller, DistillerOutput, DistillTerm

__all__ = ["Distiller", "DistillerOutput", "DistillTerm"]
__version__ = "0.1.0"
