"""Models: the registry and factory, the small models of the default data (``small``)
and the CIFAR knowledge-distillation zoo (``zoo``).

Importing the package registers every model.
"""
from kdablate.models import small, zoo  # noqa: F401  (registration)
from kdablate.models.factory import MODELS, build_model

__all__ = ["MODELS", "build_model"]
