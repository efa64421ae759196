"""Forward and backward over microbatches, through megatron-core's pipeline schedule when the model
is split into stages (models.stage).

`Pipeline.forward_backward` is the training step's compute: each microbatch's forward, loss and
backward, gradients accumulating. With pp > 1 it is megatron's 1F1B schedule
(`get_forward_backward_func`), which sends the packed carry between stages; the loss runs on the last
stage. `Pipeline.forward` is the forward-only path of the old policy and the KL reference (outputs
stay on the last stage, where the loss needs them) and, through `PipelinedForward`, of sampling (the
outputs are broadcast, since the next Euler step starts on the first stage). With one stage both are
a plain loop over the microbatches and need no megatron.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models import LTX2AVTransformer

from .. import profiling
from ..algorithm.reweighting import V2AMassRecorder
from .layout import ProcessLayout

Outputs = tuple[Tensor, Tensor]  # (v_video, v_audio)
# loss_fn(microbatch index, outputs) -> (this microbatch's share of the step's loss, detached values to log)
LossFn = Callable[[int, Outputs], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class Microbatch:
    """One call of the model: the positional and keyword arguments of LTX2AVTransformer.forward."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.args[0].shape[0]


def split_batch(args: tuple, kwargs: dict, size: int) -> list[Microbatch]:
    """Cuts one call's batch into microbatches of `size` rows (0: one microbatch); non-tensor
    arguments (grid, fps, probes) are shared."""
    n = args[0].shape[0]
    size = size or n
    if n % size:
        raise ValueError(
            f"a batch of {n} samples does not split into microbatches of {size} (train.micro_batch_size must divide it)"
        )

    def rows(x, s):
        return x[s : s + size] if isinstance(x, Tensor) else x

    return [
        Microbatch(tuple(rows(a, s) for a in args), {k: rows(v, s) for k, v in kwargs.items()})
        for s in range(0, n, size)
    ]


class _ScheduleModel:
    """What megatron's schedule expects of a model: a ModelParallelConfig under `config` (the p2p
    settings) and `set_input_tensor`; `module` is the stage itself."""

    def __init__(self, module: LTX2AVTransformer, config):
        self.module, self.config = module, config

    def set_input_tensor(self, tensors: list[Tensor]) -> None:
        self.module.set_input_tensor(tensors)


class Pipeline:
    """Runs this rank's stage of a model over microbatches; `autocast` wraps every model call (mixed
    precision), `layout` says where the last stage is (outputs are broadcast from it)."""

    def __init__(self, layout: ProcessLayout, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext):
        self.layout, self.autocast = layout, autocast

    # ---- the two entry points --------------------------------------------------------------------
    def forward(self, model: LTX2AVTransformer, microbatches: list[Microbatch]) -> list[Outputs]:
        """Forward only, no gradients: the outputs of each microbatch on the last stage ([] elsewhere)."""
        with torch.no_grad():
            if model.stage.count == 1:
                return [self._call(model, mb) for mb in microbatches]
            return self._schedule(model, microbatches, None, forward_only=True)

    def forward_backward(
        self,
        model: LTX2AVTransformer,
        microbatches: list[Microbatch],
        loss_fn: LossFn,
        no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> list[dict[str, Tensor]]:
        """Forward, loss and backward of every microbatch, accumulating into the parameters' gradients;
        `no_sync` is entered around every backward but the last (data-parallel reduction waits for
        the last). Returns loss_fn's logged values per microbatch on the last stage ([] elsewhere)."""
        if model.stage.count == 1:
            logged = []
            for i, mb in enumerate(microbatches):
                with profiling.nvtx_range(profiling.TRAIN_FWD):
                    loss, values = loss_fn(i, self._call(model, mb))
                with (
                    profiling.nvtx_range(profiling.TRAIN_BWD),
                    no_sync() if i < len(microbatches) - 1 else contextlib.nullcontext(),
                ):
                    loss.backward()
                logged.append(values)
            return logged
        return self._schedule(model, microbatches, loss_fn, forward_only=False, no_sync=no_sync)

    # ---- helpers ---------------------------------------------------------------------------------
    def _call(self, model: LTX2AVTransformer, mb: Microbatch):
        with self.autocast():
            return model(*mb.args, **mb.kwargs)

    def _schedule(
        self,
        model: LTX2AVTransformer,
        microbatches: list[Microbatch],
        loss_fn: LossFn | None,
        forward_only: bool,
        no_sync: Callable[[], AbstractContextManager] | None = None,
    ) -> list:
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.pipeline_parallel import get_forward_backward_func

        first = microbatches[0]
        for i, mb in enumerate(microbatches):
            if mb.size != first.size or any(
                isinstance(a, Tensor) and a.shape != b.shape for a, b in zip(mb.args, first.args)
            ):
                raise ValueError(
                    f"pipeline microbatch {i} differs in shape from microbatch 0: the schedule sends "
                    f"fixed-shape tensors"
                )
        video, audio, _, video_ctx, audio_ctx = first.args[:5]
        shapes = model.carry_shapes(
            first.size,
            video.shape[1],
            audio.shape[1],
            video_ctx.shape[1],
            audio_ctx.shape[1],
            first.kwargs.get("video_sigma") is not None,
            first.kwargs.get("audio_sigma") is not None,
        )
        dtype = next(model.parameters()).dtype
        config = ModelParallelConfig(
            pipeline_model_parallel_size=model.stage.count,
            pipeline_dtype=dtype,
            batch_p2p_sync=False,
            timers=profiling.ScheduleTimers(not forward_only),
            no_sync_func=no_sync,
        )
        # TransformerConfig fields the schedule reads: the carry is packed flat, (L, B, 1); each
        # microbatch's loss is already weighted by the trainer (see `_loss`).
        config.hidden_size, config.calculate_per_token_loss = 1, True

        def step(data_iterator, _model):
            i = next(data_iterator)
            out = self._call(model, microbatches[i])
            return out, None if loss_fn is None else functools.partial(self._loss, loss_fn, i)

        run = get_forward_backward_func()
        try:
            return run(
                forward_step_func=step,
                data_iterator=iter(range(len(microbatches))),
                model=[_ScheduleModel(model, config)],
                num_microbatches=len(microbatches),
                seq_length=sum(math.prod(s[1:]) for s in shapes.values()),
                micro_batch_size=first.size,
                forward_only=forward_only,
            )
        finally:
            model.set_input_tensor(None)  # neither keep the last carry alive nor let a later call reuse it

    @staticmethod
    def _loss(loss_fn: LossFn, i: int, outputs: Outputs):
        """megatron's 3-tuple loss form with one 'token': the schedule neither divides by the number of
        microbatches nor by tokens (the trainer's loss_fn already weights each microbatch)."""
        loss, values = loss_fn(i, outputs)
        return loss, torch.ones((), dtype=torch.int, device=loss.device), values

    def broadcast_outputs(
        self, model: LTX2AVTransformer, outputs: list[Outputs], microbatches: list[Microbatch]
    ) -> Outputs:
        """The microbatches' outputs concatenated, in the parameter dtype, on every stage (the loss of
        the last stage is where they came from; the first stage needs them for the next step)."""
        dtype = next(model.parameters()).dtype
        if model.stage.last:
            video = torch.cat([o[0] for o in outputs]).to(dtype)
            audio = torch.cat([o[1] for o in outputs]).to(dtype)
        else:
            n = sum(mb.size for mb in microbatches)
            v, a = microbatches[0].args[:2]
            video = torch.empty((n, *v.shape[1:]), dtype=dtype, device=v.device)
            audio = torch.empty((n, *a.shape[1:]), dtype=dtype, device=a.device)
        self.layout.broadcast_from_last_stage([video, audio])
        return video, audio


class PipelinedForward:
    """A stage with the model's call signature for the sampler: the batch is cut into microbatches
    that run through the pipeline, and every rank gets the whole outputs."""

    def __init__(self, pipeline: Pipeline, model: LTX2AVTransformer, micro_batch_size: int):
        self.pipeline, self.model, self.micro_batch_size = pipeline, model, micro_batch_size

    def __call__(self, *args, v2a_probe: V2AMassRecorder | None = None, **kwargs) -> Outputs:
        microbatches = split_batch(args, kwargs, self.micro_batch_size)
        if v2a_probe is not None:  # tell the recorder which rows of the whole batch each microbatch holds
            for k, mb in enumerate(microbatches):
                mb.kwargs["v2a_probe"] = v2a_probe.rows_from(k * mb.size)
        return self.pipeline.broadcast_outputs(
            self.model, self.pipeline.forward(self.model, microbatches), microbatches
        )
