"""Knowledge components: the parts a soft target is assembled from.

A soft target q for label y among K classes is built from a non-ground-truth
*mass* m (how much probability leaves y) and a *structure* r (how m spreads over
the other K-1 classes): q_y = 1 - m, q_c = m * r_c. See Gu, Wu & Tresp,
"Introspective Learning by Distilling Knowledge from Online Self-explanation"
(ACCV 2020, arXiv:2009.09140), and Hinton et al. (2015) for the KD loss.
"""
from kdablate.components.context import Need, TargetContext
from kdablate.components.mass import MASSES
from kdablate.components.structure import STRUCTURES
from kdablate.components import explanation as _explanation  # noqa: F401  (registers 'explanation')
from kdablate.components.target import assemble_target, ce_only_loss, soft_target_loss, stacked_soft_target_loss

__all__ = [
    "MASSES",
    "Need",
    "STRUCTURES",
    "TargetContext",
    "assemble_target",
    "ce_only_loss",
    "soft_target_loss",
    "stacked_soft_target_loss",
]
