"""How the processes of a run share the work: the one process-layout object, data-parallel gradient
reductions, and the pipeline schedule."""

from .grads import GradSync, MegatronGradSync, grad_sync
from .layout import ParallelConfig, ProcessLayout, init_layout, init_one_process
from .pipeline import Microbatch, Pipeline, PipelinedForward, split_batch

__all__ = [
    "GradSync",
    "MegatronGradSync",
    "Microbatch",
    "ParallelConfig",
    "Pipeline",
    "PipelinedForward",
    "ProcessLayout",
    "grad_sync",
    "init_layout",
    "init_one_process",
    "split_batch",
]
