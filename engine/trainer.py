"""The OmniNFT loop (SPEC section 6): prompts -> rollout from the old policy -> decode (only for rewards
that read media) -> rewards -> routed advantages and region weights -> train -> EMA.

One `Trainer.iteration` is Algorithm 1 once; `Trainer.run` adds logging, media, evaluation
(`Trainer.evaluate`, on held-out prompts with its own noise), checkpoints and resume. The rollout half
(sampling in chunks, decoding, scoring, evaluation) is `engine.rollout.RolloutPhases`. Text contexts
come from `engine.data.conditioning` (prepared before the DiT is built), decoders from
`engine.rewards.decode`. Where each idea lives: routing `engine.algorithm.advantages`, loss
`engine.algorithm.loss`, surgery `engine.algorithm.surgery` (applied via `model.set_a2v_grad_scales`), reweighting
`engine.algorithm.reweighting` (its recorder is the model's V2A probe during the rollout). Under
torchrun, `engine.parallel.ProcessLayout` decides which samples this rank handles and does every
reduction.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from models.latents import frame_ids

from . import profiling, run_dir
from .algorithm.advantages import optimality_probability, route_advantages
from .algorithm.loss import nft_loss
from .algorithm.reweighting import region_weights
from .algorithm.surgery import a2v_grad_scales
from .checkpoint import CheckpointManager, TrainState
from .data.conditioning import Conditioning, StandInConditioning, TextConditioning, run_texts
from .errors import ConfigError
from .fields import bounded, choice
from .guard import NonFiniteError, StepGuard
from .metrics import MetricsLogger, console, format_line, plot_rewards
from .noise import training_noise
from .optim import apply_hyper_parameters, clip_and_step, grad_norm, make_optimizer, scheduled_lr, set_lr
from .parallel import Pipeline, ProcessLayout, grad_sync, init_layout, split_batch
from .policy import (
    DTYPES,
    add_adapters,
    autocast,
    build_policy,
    ema_decay,
    ema_update,
    model_config,
    old_and_reference,
)
from .preemption import Preemption
from .rewards import Rollout, build_rewards, reads_media
from .rewards.decode import Decoders, decode_source
from .rollout import RolloutPhases
from .sampler import SIGMA_MODES, training_sigmas

if TYPE_CHECKING:  # config.py composes TrainConfig from here
    from .config import Config

LOSS_KEYS = ("loss", "loss/video", "loss/audio", "loss/kl")


@dataclass
class TrainConfig:
    """`train.*`: the rollout batch, the mini-batches the optimizer steps on, and the training sigmas."""

    prompts_per_iteration: int = bounded(1, None, default=4)
    group_size: int = bounded(2, None, default=8)
    batch_size: int = bounded(1, None, default=16)
    sigma_mode: str = choice(*SIGMA_MODES, default="highest")
    sigma_fraction: float = bounded(1e-6, 1.0, default=0.4)  # 'highest': share of the schedule's steps
    num_sigmas: int = bounded(1, None, default=4)  # 'uniform'/'logit_normal': draws per iteration
    activation_checkpointing: bool = False  # recompute each block in backward (LTX-2 trainer does, for 19B)
    # Optimizer steps with a non-finite output, loss or gradient that are skipped before the run stops.
    max_bad_steps: int = bounded(0, None, default=0)
    # Samples per forward/backward (gradient accumulation; the pipeline's microbatches); 0 = a rank's
    # whole share of the mini-batch. It must divide that share.
    micro_batch_size: int = bounded(0, None, default=0)
    # Samples a rank samples at once in a rollout: each chunk's rewards start on it while the next chunk
    # samples (remote rewards in the background); 0 = the rank's whole rollout in one chunk. A multiple of
    # micro_batch_size when that is set.
    rollout_chunk: int = bounded(0, None, default=0)

    def __post_init__(self) -> None:
        m, c = self.micro_batch_size, self.rollout_chunk
        if m and c and c % m:
            raise ConfigError(f"train.rollout_chunk={c} must be a multiple of train.micro_batch_size={m}")


class Trainer(RolloutPhases):
    """One OmniNFT run of `cfg` on this rank. With `for_training` (not for `omninft sample`), the run
    directory is checked first (engine.run_dir): whether it resumes, and what it may overwrite."""

    def __init__(self, cfg: Config, layout: ProcessLayout | None = None, for_training: bool = True):
        self.cfg = cfg
        self.layout = layout or init_layout(cfg.parallel, cfg.model.backend, cfg.model.init_seed)
        self.device = self.layout.device
        m, n = cfg.train.micro_batch_size, cfg.train.prompts_per_iteration * cfg.train.group_size
        shares = {len(b) for b in self.layout.local_indices(n, cfg.train.batch_size)}  # checks DP sharing too
        if m and any(share % m for share in shares):
            raise ConfigError(
                f"train.micro_batch_size={m} must divide each rank's share of a mini-batch "
                f"({', '.join(map(str, sorted(shares)))} samples here)"
            )
        self.total_steps = cfg.iterations * -(-n // cfg.train.batch_size)  # one per global mini-batch
        if cfg.eval.every:
            self.check_eval_layout()
        self.checkpoints = CheckpointManager(
            cfg.run_dir,
            cfg.checkpoint_format,
            self.layout,
            cfg.parallel.distributed_optimizer,
            keep=cfg.checkpoint_keep,
            keep_every=cfg.checkpoint_keep_every,
        )
        self.stopped_by: str | None = None  # the signal that ended `run` early (engine.preemption)
        self.resuming = for_training and run_dir.prepare(
            dataclasses.asdict(cfg), cfg.run_dir, self.checkpoints, self.layout
        )
        # Text first: prompts the cache lacks are encoded before any DiT weights take device memory.
        shape = model_config(cfg.model)
        self.conditioning = self.build_conditioning((shape.video_context_dim, shape.audio_context_dim))
        self.model = build_policy(cfg.model, self.layout, cfg.parallel.sequence_parallel)
        add_adapters(cfg.lora, self.model, cfg.model.init_seed)  # with lora.rank > 0: the base is frozen
        self.model.set_a2v_grad_scales(a2v_grad_scales(cfg.surgery.schedule, self.model.config.num_layers))
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.old_model, self.ref_model = old_and_reference(cfg.model, self.model, kl=cfg.loss.kl_weight > 0)
        self.grad_sync = grad_sync(self.model, self.layout, cfg.parallel.distributed_optimizer)
        self.optimizer = make_optimizer(cfg.optim, self.model, self.grad_sync, cfg.parallel.distributed_optimizer)
        self.rewards = build_rewards(cfg.rewards)  # a remote reward's server is asked for its /info here
        self.reward_names = [r.name for r in self.rewards]
        remote = [r for r in self.rewards if getattr(r, "remote", False)]  # scored in background threads
        self.reward_pool = (
            ThreadPoolExecutor(sum(getattr(r, "concurrency", 1) for r in remote), "reward") if remote else None
        )
        # Decoders only for rewards that read media (and media logging): a latent-only run never loads them.
        self.media_parts = reads_media(self.rewards)
        self.decoders = None
        if self.media_parts or cfg.log.media_every:
            self.decoders = Decoders(
                cfg.decode,
                decode_source(cfg.decode, cfg.model.init),
                self.device,
                video="frames" in self.media_parts or bool(cfg.log.media_every),
                audio="waveform" in self.media_parts or bool(cfg.log.media_every),
            )
        self.logger: MetricsLogger | None = None  # the main rank's, while `run` runs
        if cfg.log.media_every and importlib.util.find_spec("av") is None:  # fail now, not on the main rank later
            raise ConfigError('log.media_every needs PyAV: pip install -c .ci/constraints.txt -e ".[media]"')
        self.grid = tuple(cfg.task.video_grid)
        self.geometry = self.model.config.geometry
        self.num_audio = self.geometry.audio_tokens_for(self.grid[0], cfg.task.fps)
        self.sigmas = cfg.sampler.sigmas()
        self.frame_ids = frame_ids(self.grid, self.device)
        self.state = TrainState(iteration=-1, step=0)
        self.dtype = DTYPES[cfg.model.dtype]
        self.pipeline = Pipeline(self.layout, lambda: autocast(cfg.model, self.device))

    def build_conditioning(self, widths: tuple[int, int]) -> Conditioning:
        """The text contexts of the run, `widths` = the DiT's (video, audio) context widths (caption_channels
        both, or LTX-2.3's stream widths): the stand-in features without `text.encoder`; else the real LTX-2
        path, with every training prompt and negative prompt encoded (or found in the cache) before the DiT
        trains, each rank encoding its share."""
        cfg = self.cfg
        if cfg.text.encoder is None:
            return StandInConditioning(cfg.task.context_tokens, widths[0], audio_channels=widths[1])
        texts = run_texts((*cfg.task.records(), *(cfg.task.eval_records() or ())), cfg.text.negative_prompt)
        with self.layout.collectively("preparing the text contexts"):  # also waits for every rank's share
            conditioning = TextConditioning(
                cfg.text, cfg.model.init, texts, self.device, self.layout.rank, self.layout.sizes["world"]
            )
        with self.layout.collectively("reading the text cache"):
            conditioning.check_complete(texts)
        if tuple(conditioning.context_channels) != tuple(widths):
            raise ConfigError(
                f"text connectors give {'x'.join(map(str, conditioning.context_channels))} (video x audio) contexts "
                f"but the DiT takes {'x'.join(map(str, widths))}: text.connectors and model.init are different releases"
            )
        return conditioning

    def train(
        self,
        iteration: int,
        batches: list[list[int]],
        rollout: Rollout,
        ctx: tuple[Tensor, Tensor],
        r_video: Tensor,
        r_audio: Tensor,
        token_weights: Tensor | None,
    ) -> dict[str, float]:
        """One optimizer step per global mini-batch (`train_step`), then the logged means over the
        steps and the data-parallel ranks. Tensors are indexed by position in this rank's rollout."""
        cfg = self.cfg
        sigmas = training_sigmas(
            self.sigmas, cfg.train.sigma_mode, cfg.train.sigma_fraction, cfg.train.num_sigmas, cfg.seed, iteration
        )
        totals = dict.fromkeys(LOSS_KEYS, 0.0)
        norms, t_ema, start = [], 0.0, 0
        for batch in batches:
            pos = list(range(start, start + len(batch)))
            start += len(batch)
            step_totals, norm = self.train_step(
                iteration, sigmas, batch, pos, rollout, ctx, r_video, r_audio, token_weights
            )
            for k, v in zip(LOSS_KEYS, step_totals):
                totals[k] += v / len(batches)
            if norm is None:  # a non-finite step, skipped: nothing moved, so neither does the old policy
                continue
            norms.append(norm)
            t0 = time.perf_counter()
            with profiling.nvtx_range(profiling.EMA):
                eta = ema_decay(self.state.step, cfg.ema.decay_rate, cfg.ema.max_decay)
                ema_update(self.old_model, self.model, eta)
            t_ema += time.perf_counter() - t0
        totals = {k: self.layout.mean_over("dp", v) for k, v in totals.items()}
        return {
            **totals,
            "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
            "bad_steps": self.state.bad_steps,
            "lr": scheduled_lr(cfg.optim, max(0, self.state.step - 1), self.total_steps),  # the last step's
            "time/ema": t_ema,
            "train_sigmas": len(sigmas),
        }

    def train_step(
        self,
        iteration: int,
        sigmas: list[float],
        batch: list[int],
        pos: list[int],
        rollout: Rollout,
        ctx: tuple[Tensor, Tensor],
        r_video: Tensor,
        r_audio: Tensor,
        token_weights: Tensor | None,
    ) -> tuple[list[float], float | None]:
        """One optimizer step on global mini-batch `batch` (this rank's samples, at rollout positions
        `pos`): the loss is accumulated over the training sigmas and the microbatches (through the
        pipeline when there are stages), gradients are reduced over ranks, clipped, and AdamW steps.
        Returns the step's loss parts (LOSS_KEYS, on every stage) and the gradient norm; None for
        the norm when a non-finite value skipped the step (engine.guard)."""
        cfg = self.cfg
        on = {"device": self.device, "dtype": self.dtype}
        g = cfg.train.group_size
        x0_v, x0_a = rollout.video[pos].to(**on), rollout.audio[pos].to(**on)
        c_v, c_a, rv, ra = ctx[0][pos], ctx[1][pos], r_video[pos], r_audio[pos]
        tw = None if token_weights is None else token_weights[pos]
        microbatches, rows = [], []
        for j, s in enumerate(sigmas):
            noise = [
                training_noise(cfg.seed, iteration, rollout.prompts[p], i % g, j, x0_v.shape[1:], x0_a.shape[1:])
                for p, i in zip(pos, batch)
            ]
            eps_v, eps_a = (torch.stack([n[k] for n in noise]).to(**on) for k in (0, 1))
            sig = torch.full((len(pos),), s, **on)
            xt_v, xt_a = (1 - s) * x0_v + s * eps_v, (1 - s) * x0_a + s * eps_a
            split = split_batch((xt_v, xt_a, sig, c_v, c_a, self.grid, cfg.task.fps), {}, cfg.train.micro_batch_size)
            microbatches += split
            rows += [slice(k * mb.size, (k + 1) * mb.size) for k, mb in enumerate(split)]
        guard = StepGuard(len(microbatches), self.device)
        with profiling.nvtx_range(profiling.TRAIN_FWD):
            v_old = self.pipeline.forward(self.old_model, microbatches)
            v_ref = self.pipeline.forward(self.ref_model, microbatches) if self.ref_model is not None else None
        for i, (video, audio) in enumerate(v_old):  # outputs live on the last pipeline stage
            guard.check("old-policy video output", i, video)
            guard.check("old-policy audio output", i, audio)
        # Each microbatch's loss is its share of the mean over the batch and the sigmas.
        w = microbatches[0].size / len(pos) / len(sigmas)

        def loss_fn(i: int, v_theta: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            rs, (xt_v, xt_a, sig) = rows[i], microbatches[i].args[:3]
            out = nft_loss(
                {"x0": x0_v[rs], "x_t": xt_v, "sigma": sig, "v_old": v_old[i][0], "v_theta": v_theta[0]},
                {"x0": x0_a[rs], "x_t": xt_a, "sigma": sig, "v_old": v_old[i][1], "v_theta": v_theta[1]},
                rv[rs],
                ra[rs],
                beta=cfg.loss.beta,
                adv_clip=cfg.advantage.adv_clip,
                video_token_weights=None if tw is None else tw[rs],
                kl_weight=cfg.loss.kl_weight,
                v_ref=None if v_ref is None else v_ref[i],
            )
            guard.check("policy video output", i, v_theta[0])
            guard.check("policy audio output", i, v_theta[1])
            for part, value in zip(LOSS_KEYS[1:], (out.video, out.audio, out.kl)):
                guard.check(part, i, value)
            # Logged as tensors: a float() here would stall the pipeline on a host sync per microbatch.
            parts = (out.total, out.video, out.audio, out.kl)
            return out.total * w, {k: v.detach() * w for k, v in zip(LOSS_KEYS, parts)}

        self.grad_sync.start()
        logged = self.pipeline.forward_backward(self.model, microbatches, loss_fn, self.grad_sync.no_sync)
        step_totals = self.layout.from_last_stage(
            [float(sum(values[k] for values in logged)) if logged else 0.0 for k in LOSS_KEYS]
        )
        with profiling.nvtx_range(profiling.OPTIMIZER):
            self.grad_sync.finish()
            norm = grad_norm(self.model, self.layout)  # under the distributed optimizer: its finiteness only
            guard.check("gradient", 0, norm)
            bad = guard.verdict(self.layout)
            if bad is not None:
                self.skip_step(iteration, *bad, sigma=float(microbatches[bad[1]].args[2][0]))
                return step_totals, None
            set_lr(self.optimizer, scheduled_lr(cfg.optim, self.state.step, self.total_steps))
            norm = clip_and_step(self.model, self.optimizer, cfg.optim.grad_clip, self.layout, norm)
        self.state.step += 1
        return step_totals, norm

    def skip_step(self, iteration: int, site: str, microbatch: int, sigma: float) -> None:
        """Drops the gradients of a step with a non-finite `site`, counts it, and stops the run once
        more than `train.max_bad_steps` were skipped (the last checkpoint is from before them)."""
        where = f"iteration {iteration}"
        if site == "gradient":
            names = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            site = f"gradient of {names[0]}" if names else "gradient (on another rank)"
        else:
            where += f", training sigma {sigma:.4f} (microbatch {microbatch})"
        self.optimizer.zero_grad()
        self.state.bad_steps += 1
        limit = self.cfg.train.max_bad_steps
        message = f"non-finite {site} at {where}: the step was not applied ({self.state.bad_steps} skipped"
        if self.state.bad_steps > limit:
            raise NonFiniteError(f"{message}, train.max_bad_steps={limit}); the run stops, its checkpoints are intact")
        if self.layout.is_main:
            console(f"warning: {message} of at most {limit})")

    def iteration(self, iteration: int) -> dict:
        cfg, layout, times = self.cfg, self.layout, {}
        t0 = time.perf_counter()
        prompts = self.prompts_for(iteration)
        n = len(prompts) * cfg.train.group_size
        batches = layout.local_indices(n, cfg.train.batch_size)
        local = [i for b in batches for i in b]
        rollout, ctx, v2a_score, result = self.sample_and_score(iteration, prompts, local, times)
        if self.reward_verdict(iteration, result):
            self.state.iteration = iteration
            return {
                "iteration": iteration,
                "step": self.state.step,
                "skipped": 1,
                "skipped_iterations": self.state.skipped_iterations,
                **{f"reward_failure/{name}": 1 for name in result.failures},
                **times,
                "time/iteration": time.perf_counter() - t0,
            }
        scores = {name: layout.gather_samples(v.to(self.device), local, n) for name, v in result.values.items()}
        if self.logger is not None and cfg.log.media_every and (iteration + 1) % cfg.log.media_every == 0:
            self.save_media("train", iteration, rollout, self.sample_keys(iteration, prompts, local))

        t = time.perf_counter()
        with profiling.nvtx_range(profiling.ADVANTAGE):
            group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(cfg.train.group_size)
            routed = route_advantages(
                scores,
                {r.name: r.modality for r in self.rewards},
                {r.name: r.weight for r in self.rewards},
                group_ids,
                cfg.advantage.routing,
                cfg.advantage.std,
                cfg.advantage.eps,
            )
            r_video = optimality_probability(routed.video, cfg.advantage.adv_clip)[local]
            r_audio = optimality_probability(routed.audio, cfg.advantage.adv_clip)[local]
            weights = None
            if v2a_score is not None:
                weights = region_weights(
                    v2a_score,
                    cfg.reweight.mode,
                    cfg.reweight.lam,
                    self.frame_ids,
                    step=self.state.step,
                    warmup_steps=cfg.reweight.warmup_steps,
                )
        times["time/advantage"] = time.perf_counter() - t

        t = time.perf_counter()
        self.model.train()
        train_metrics = self.train(iteration, batches, rollout, ctx, r_video, r_audio, weights)
        times["time/train"] = time.perf_counter() - t - train_metrics["time/ema"]
        self.state.iteration = iteration

        metrics = {
            "iteration": iteration,
            "step": self.state.step,
            "skipped_iterations": self.state.skipped_iterations,
            **train_metrics,
            **times,
            "time/iteration": time.perf_counter() - t0,
        }
        for name, value in scores.items():
            metrics[f"reward/{name}"] = float(value.mean())
            metrics[f"reward_std/{name}"] = float(value.std(unbiased=False))
        for branch, adv in (("video", routed.video), ("audio", routed.audio)):
            metrics.update(
                {
                    f"adv/{branch}_mean": float(adv.mean()),
                    f"adv/{branch}_std": float(adv.std(unbiased=False)),
                    f"adv/{branch}_min": float(adv.min()),
                    f"adv/{branch}_max": float(adv.max()),
                }
            )
        for name, adv in routed.per_reward.items():
            metrics[f"adv/{name}_abs_mean"] = float(adv.abs().mean())
        if weights is not None:  # over all samples: each data-parallel rank holds an equal share
            metrics["region_weight/max"] = layout.max_over("dp", float(weights.max()))
            metrics["region_weight/mean"] = layout.mean_over("dp", float(weights.mean()))
        return metrics

    # ---- the run -----------------------------------------------------------------------------------
    def resume(self) -> None:
        self.state, path = self.checkpoints.resume(self.model, self.old_model, self.optimizer)
        apply_hyper_parameters(self.optimizer, self.cfg.optim)
        if self.layout.is_main:
            console(f"resumed from {path} (iteration {self.state.iteration}, step {self.state.step})")

    def save(self) -> Path:
        return self.checkpoints.save(
            self.state, self.model, self.old_model, self.optimizer, dataclasses.asdict(self.cfg)
        )

    def run(self) -> list[dict]:
        cfg, main = self.cfg, self.layout.is_main
        if self.resuming:
            self.resume()
        logger = self.logger = (
            MetricsLogger(
                cfg.run_dir, cfg.log, self.state.iteration if self.resuming else None, dataclasses.asdict(cfg)
            )
            if main
            else None
        )
        window = profiling.ProfilerWindow(cfg.profile.start_step, cfg.profile.end_step)
        start = self.state.iteration + 1
        history = []
        bar = tqdm(
            range(start, cfg.iterations),
            desc="omninft",
            unit="it",
            disable=not (cfg.log.progress and main),
            initial=start,
            total=cfg.iterations,
        )
        with Preemption() as preemption:  # held through the last checkpoint too
            try:
                for it in bar:
                    window.step(it)
                    metrics = self.iteration(it)
                    if cfg.eval.every and (it + 1) % cfg.eval.every == 0:
                        metrics.update(self.evaluate(it))
                    history.append(metrics)
                    if main:
                        logger.log(metrics)
                        if not metrics.get("skipped"):
                            console(format_line(metrics, self.reward_names))
                            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                    self.stopped_by = self.stopped_by or preemption.agreed(self.layout)
                    if self.stopped_by is not None and it + 1 < cfg.iterations:
                        break  # the checkpoint below
                    if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                        self.save()
            finally:
                window.close()
                bar.close()
                if self.reward_pool is not None:
                    self.reward_pool.shutdown(wait=False, cancel_futures=True)
                if logger is not None:
                    logger.close()
                    self.logger = None
            if history:
                path = self.save()
                if main:
                    console(f"checkpoint: {path}")
                    if self.stopped_by is not None:
                        it = self.state.iteration
                        console(f"stopped by {self.stopped_by} after iteration {it}: continue with --resume")
        if main and cfg.log.plot and logger.path.stat().st_size:
            plot_rewards(logger.path, Path(cfg.run_dir) / "rewards.png", self.reward_names)
        return history
