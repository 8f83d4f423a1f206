"""kdablate: ablation studies of knowledge distillation.

Implements and extends Gu, Wu & Tresp, "Introspective Learning by Distilling
Knowledge from Online Self-explanation" (ACCV 2020, arXiv:2009.09140): soft
targets are assembled from pluggable knowledge components and every cell of a
study grid runs through one trainer, logged to MLflow.
"""

__version__ = "0.1.0"
