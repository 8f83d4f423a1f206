"""kdablate: ablation studies of knowledge distillation.

Implements and extends Gu, Wu & Tresp, "Introspective Learning by Distilling
Knowledge from Online Self-explanation" (ACCV 2020, arXiv:2009.09140): soft
targets are assembled from pluggable knowledge components and every cell of a
study grid runs through one trainer, logged to MLflow.
"""

__version__ = "0.1.0"


def load_student(run_id: str, uri: str | None = None, device: str = "cpu"):  # noqa: ANN201 - nn.Module
    """The student a run saved with ``save_model: true``, in eval mode (see ``kdablate.saved``)."""
    from kdablate.saved import load_student as load  # imported on use: ``import kdablate`` stays free

    return load(run_id, uri, device)
