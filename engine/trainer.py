"""The OmniNFT loop (SPEC section 6): sample from the old policy, score, route advantages, train, EMA.

One `Trainer.iteration` is Algorithm 1 once; `Trainer.run` adds logging, checkpoints and resume.
Where each idea lives: routing `engine.advantages`, loss `engine.loss`, surgery `engine.surgery`
(applied via `model.set_a2v_grad_scales`), reweighting `engine.reweighting` (fed by the sampler's
V2A attention mass). Under torchrun, `engine.distributed` decides which samples this rank handles.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

import models
from models import LTX2AVTransformer
from models.checkpoint import gather_full_state, load_full_state

from . import profiling
from .advantages import optimality_probability, route_advantages
from .checkpoint import (TrainState, checkpoint_root, is_distributed_checkpoint, latest_checkpoint, point_latest,
                         read_checkpoint, save_checkpoint)
from .config import DTYPES, Config, ConfigError, to_dict
from .data_parallel import DistributedAdamW, grad_sync
from .distributed import ParallelContext, init_parallel
from .loss import nft_loss
from .pipeline import Pipeline, PipelinedForward, split_batch
from .metrics import MetricsLogger, console, format_line, plot_rewards
from .policy import build_optimizer, clip_and_step, ema_decay, ema_update, training_sigmas
from .reweighting import reference_blocks, reference_steps, region_weights
from .rewards import Rollout, build_rewards, score_rewards
from .sampler import ltx2_sigmas, prompt_features, rollout_noise, sample, training_noise
from .surgery import a2v_grad_scales

AUDIO_TOKENS_PER_SECOND = 25.0


def audio_tokens_for(video_grid: tuple[int, int, int], fps: float) -> int:
    """Audio latents covering the clip: (8(F-1)+1) pixel frames at `fps`, 25 audio tokens per second."""
    frames = 8 * (video_grid[0] - 1) + 1
    return max(2, round(frames / fps * AUDIO_TOKENS_PER_SECOND))


def layer_backend(cfg: Config) -> models.TorchBackend:
    kwargs = {}
    if cfg.model.backend in ("megatron", "te"):
        kwargs["sequence_parallel"] = cfg.parallel.sequence_parallel
    if cfg.model.backend == "te":
        kwargs["fp8_recipe"] = cfg.model.fp8_recipe
    return models.backend.resolve_backend(cfg.model.backend, **kwargs)


def build_policy(cfg: Config, device: torch.device, stage: models.Stage | None = None) -> LTX2AVTransformer:
    """This rank's share of the model (its pipeline stage, its tensor-parallel slices) with its
    starting weights: `model.init` (each rank reads only its share), or a seeded random init made as
    one process would make it (so the run does not depend on the layout; it builds the whole model on
    every rank, fine for `tiny`)."""
    model = models.build_model(cfg.model.preset, device=device, backend=layer_backend(cfg), stage=stage)
    if cfg.model.init is not None:
        models.load_model_weights(model, cfg.model.init)
    else:
        torch.manual_seed(cfg.model.init_seed)
        load_full_state(model, models.build_model(cfg.model.preset).state_dict())
    return model.to(DTYPES[cfg.model.dtype])


def frozen_copy(cfg: Config, model: LTX2AVTransformer) -> LTX2AVTransformer:
    """Same backend, layout and weights, no gradients (the old policy and the KL reference)."""
    copy = models.build_model(cfg.model.preset, device=next(model.parameters()).device,
                              dtype=DTYPES[cfg.model.dtype], backend=layer_backend(cfg), stage=model.stage)
    copy.load_state_dict(model.state_dict())
    return copy.requires_grad_(False)


class Trainer:
    def __init__(self, cfg: Config, parallel: ParallelContext | None = None):
        self.cfg = cfg
        self.parallel = parallel or init_parallel(cfg)
        self.run_dir = Path(cfg.run_dir)
        self.device = self.parallel.device
        self.model = build_policy(cfg, self.device, self.parallel.stage)
        self.model.set_a2v_grad_scales(a2v_grad_scales(cfg.surgery.schedule, self.model.config.num_layers))
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.old_model = frozen_copy(cfg, self.model)
        self.ref_model = frozen_copy(cfg, self.model) if cfg.loss.kl_weight > 0 else None
        self.grad_sync = grad_sync(self.model, self.parallel, cfg.parallel.distributed_optimizer)
        o = cfg.optim
        self.optimizer = DistributedAdamW(self.grad_sync, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, o.grad_clip) \
            if cfg.parallel.distributed_optimizer else \
            build_optimizer(self.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
        self.rewards = build_rewards(cfg.rewards)
        self.reward_names = [r.name for r in self.rewards]
        self.grid = tuple(cfg.task.video_grid)
        self.num_audio = audio_tokens_for(self.grid, cfg.task.fps)
        self.sigmas = ltx2_sigmas(cfg.sampler.steps, 2.05 if cfg.sampler.shift is None else cfg.sampler.shift,
                                  cfg.sampler.terminal)
        self.contexts = {p: prompt_features(p, cfg.task.context_tokens, self.model.config.caption_channels)
                         for p in [*cfg.task.prompts, ""]}
        f, h, w = self.grid
        self.frame_ids = torch.arange(f * h * w, device=self.device) // (h * w)
        self.state = TrainState(iteration=-1, step=0)
        self.layout = {"tp": self.parallel.tp, "pp": self.parallel.pp, "dp": self.parallel.dp}
        self.dtype = DTYPES[cfg.model.dtype]
        self.pipeline = Pipeline(self.parallel, self.autocast)
        m, n = cfg.train.micro_batch_size, cfg.train.prompts_per_iteration * cfg.train.group_size
        shares = {len(b) for b in self.parallel.local_indices(n, cfg.train.batch_size)}
        if m and any(share % m for share in shares):
            raise ConfigError(f"train.micro_batch_size={m} must divide each rank's share of a mini-batch "
                              f"({', '.join(map(str, sorted(shares)))} samples here)")

    def autocast(self):
        """Mixed precision for every model forward (`model.autocast`); a no-op when off."""
        mode = self.cfg.model.autocast
        return contextlib.nullcontext() if mode == "off" else torch.autocast(self.device.type, dtype=DTYPES[mode])

    # ---- one iteration, phase by phase -------------------------------------------------------------
    def prompts_for(self, iteration: int) -> list[str]:
        """Iteration i takes the next `prompts_per_iteration` prompts, cycling through the list."""
        ps, k = self.cfg.task.prompts, self.cfg.train.prompts_per_iteration
        return [ps[(iteration * k + j) % len(ps)] for j in range(k)]

    def rollout(self, iteration: int, prompts: list[str], indices: list[int]) -> tuple[Rollout, Tensor, Tensor | None]:
        """Samples `indices` of the iteration (sample i is number i % G of prompt i // G) from the old
        policy; returns them as a Rollout (on the CPU, where rewards score them), their text contexts
        and their V2A scores (on the device)."""
        cfg, mc = self.cfg, self.model.config
        g = cfg.train.group_size
        f, h, w = self.grid
        texts = [prompts[i // g] for i in indices]
        noise = [rollout_noise(cfg.seed, iteration, prompts[i // g], i % g, (f * h * w, mc.in_channels),
                               (self.num_audio, mc.audio_in_channels)) for i in indices]
        on = {"device": self.device, "dtype": self.dtype}
        ctx = torch.stack([self.contexts[p] for p in texts]).to(**on)
        uncond = self.contexts[""].to(**on).expand_as(ctx)
        record = cfg.reweight.mode != "off"
        result = sample(
            PipelinedForward(self.pipeline, self.old_model, cfg.train.micro_batch_size),
            torch.stack([n[0] for n in noise]).to(**on), torch.stack([n[1] for n in noise]).to(**on), ctx, ctx,
            self.grid, cfg.task.fps, self.sigmas, cfg.sampler.cfg_video, cfg.sampler.cfg_audio, (uncond, uncond),
            record_steps=reference_steps(cfg.sampler.steps, cfg.reweight.first_step, cfg.reweight.last_step)
            if record else (),
            record_blocks=reference_blocks(mc.num_layers, cfg.reweight.first_deep_block) if record else ())
        rollout = Rollout(video=result.video.float().cpu(), audio=result.audio.float().cpu(), video_grid=self.grid,
                          fps=cfg.task.fps, prompts=tuple(texts))
        score = None if result.v2a_score is None else self.parallel.sum_over_stages(result.v2a_score)
        return rollout, ctx, score

    def train(self, iteration: int, batches: list[list[int]], rollout: Rollout, ctx: Tensor, r_video: Tensor,
              r_audio: Tensor, token_weights: Tensor | None) -> dict[str, float]:
        """One optimizer step per global mini-batch: the loss is accumulated over the training sigmas and
        the microbatches of this rank's share of the batch (through the pipeline when there are stages),
        gradients are reduced over ranks, clipped, AdamW steps, and the old policy moves by EMA.
        Tensors are indexed by position in this rank's rollout."""
        cfg, par = self.cfg, self.parallel
        on = {"device": self.device, "dtype": self.dtype}
        sigmas = training_sigmas(self.sigmas, cfg.train.sigma_mode, cfg.train.sigma_fraction, cfg.train.num_sigmas,
                                 cfg.seed, iteration)
        g = cfg.train.group_size
        keys = ("loss", "loss/video", "loss/audio", "loss/kl")
        totals = dict.fromkeys(keys, 0.0)
        norms, t_ema, start = [], 0.0, 0
        for batch in batches:
            pos = list(range(start, start + len(batch)))
            start += len(batch)
            x0_v, x0_a = rollout.video[pos].to(**on), rollout.audio[pos].to(**on)
            c, rv, ra = ctx[pos], r_video[pos], r_audio[pos]
            tw = None if token_weights is None else token_weights[pos]
            microbatches, rows = [], []
            for j, s in enumerate(sigmas):
                noise = [training_noise(cfg.seed, iteration, rollout.prompts[p], i % g, j, x0_v.shape[1:],
                                        x0_a.shape[1:]) for p, i in zip(pos, batch)]
                eps_v, eps_a = (torch.stack([n[k] for n in noise]).to(**on) for k in (0, 1))
                sig = torch.full((len(pos),), s, **on)
                xt_v, xt_a = (1 - s) * x0_v + s * eps_v, (1 - s) * x0_a + s * eps_a
                split = split_batch((xt_v, xt_a, sig, c, c, self.grid, cfg.task.fps), {}, cfg.train.micro_batch_size)
                microbatches += split
                rows += [slice(k * mb.size, (k + 1) * mb.size) for k, mb in enumerate(split)]
            m = microbatches[0].size
            with profiling.nvtx_range(profiling.TRAIN_FWD):
                v_old = self.pipeline.forward(self.old_model, microbatches)
                v_ref = self.pipeline.forward(self.ref_model, microbatches) if self.ref_model is not None else None
            # Each microbatch's loss is its share of the mean over the batch and the sigmas.
            w = m / len(pos) / len(sigmas)

            def loss_fn(i: int, v_theta: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
                rs, (xt_v, xt_a, sig) = rows[i], microbatches[i].args[:3]
                out = nft_loss(
                    {"x0": x0_v[rs], "x_t": xt_v, "sigma": sig, "v_old": v_old[i][0], "v_theta": v_theta[0]},
                    {"x0": x0_a[rs], "x_t": xt_a, "sigma": sig, "v_old": v_old[i][1], "v_theta": v_theta[1]},
                    rv[rs], ra[rs], beta=cfg.loss.beta, adv_clip=cfg.advantage.adv_clip,
                    video_token_weights=None if tw is None else tw[rs], kl_weight=cfg.loss.kl_weight,
                    v_ref=None if v_ref is None else v_ref[i])
                # Logged as tensors: a float() here would stall the pipeline on a host sync per microbatch.
                return out.total * w, {k: v.detach() * w for k, v in zip(keys, (out.total, out.video, out.audio,
                                                                              out.kl))}

            self.grad_sync.start()
            logged = self.pipeline.forward_backward(self.model, microbatches, loss_fn, self.grad_sync.no_sync)
            step_totals = par.from_last_stage([float(sum(values[k] for values in logged)) if logged else 0.0
                                               for k in keys])
            for k, v in zip(keys, step_totals):
                totals[k] += v / len(batches)
            with profiling.nvtx_range(profiling.OPTIMIZER):
                self.grad_sync.finish()
                self.model.backend.finalize_grads(self.model)
                norms.append(clip_and_step(self.model, self.optimizer, cfg.optim.grad_clip))
            self.state.step += 1
            t0 = time.perf_counter()
            with profiling.nvtx_range(profiling.EMA):
                ema_update(self.old_model, self.model, ema_decay(self.state.step, cfg.ema.decay_rate, cfg.ema.max_decay))
            t_ema += time.perf_counter() - t0
        totals = {k: par.mean(v) for k, v in totals.items()}
        return {**totals, "grad_norm": sum(norms) / len(norms), "time/ema": t_ema, "train_sigmas": len(sigmas)}

    def iteration(self, iteration: int) -> dict:
        cfg, par, times = self.cfg, self.parallel, {}
        t0 = time.perf_counter()
        prompts = self.prompts_for(iteration)
        n = len(prompts) * cfg.train.group_size
        batches = par.local_indices(n, cfg.train.batch_size)
        local = [i for b in batches for i in b]
        with profiling.nvtx_range(profiling.ROLLOUT):
            rollout, ctx, v2a_score = self.rollout(iteration, prompts, local)
        times["time/rollout"] = time.perf_counter() - t0

        t = time.perf_counter()
        with profiling.nvtx_range(profiling.REWARD):
            scores = {k: par.gather_samples(v.to(self.device), local, n)
                      for k, v in score_rewards(self.rewards, rollout).items()}
        times["time/reward"] = time.perf_counter() - t

        t = time.perf_counter()
        with profiling.nvtx_range(profiling.ADVANTAGE):
            group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(cfg.train.group_size)
            routed = route_advantages(scores, {r.name: r.modality for r in self.rewards},
                                      {r.name: r.weight for r in self.rewards}, group_ids, cfg.advantage.routing,
                                      cfg.advantage.std, cfg.advantage.eps)
            r_video = optimality_probability(routed.video, cfg.advantage.adv_clip)[local]
            r_audio = optimality_probability(routed.audio, cfg.advantage.adv_clip)[local]
            weights = None
            if v2a_score is not None:
                weights = region_weights(v2a_score, cfg.reweight.mode, cfg.reweight.lam, self.frame_ids,
                                         step=self.state.step, warmup_steps=cfg.reweight.warmup_steps)
        times["time/advantage"] = time.perf_counter() - t

        t = time.perf_counter()
        self.model.train()
        train_metrics = self.train(iteration, batches, rollout, ctx, r_video, r_audio, weights)
        times["time/train"] = time.perf_counter() - t - train_metrics["time/ema"]
        self.state.iteration = iteration

        metrics = {"iteration": iteration, "step": self.state.step, **train_metrics, **times,
                   "time/iteration": time.perf_counter() - t0}
        for name, value in scores.items():
            metrics[f"reward/{name}"] = float(value.mean())
            metrics[f"reward_std/{name}"] = float(value.std(unbiased=False))
        for branch, adv in (("video", routed.video), ("audio", routed.audio)):
            metrics.update({f"adv/{branch}_mean": float(adv.mean()), f"adv/{branch}_std": float(adv.std(unbiased=False)),
                            f"adv/{branch}_min": float(adv.min()), f"adv/{branch}_max": float(adv.max())})
        for name, adv in routed.per_reward.items():
            metrics[f"adv/{name}_abs_mean"] = float(adv.abs().mean())
        if weights is not None:  # over all samples: each data-parallel rank holds an equal share
            metrics["region_weight/max"] = par.max(float(weights.max()))
            metrics["region_weight/mean"] = par.mean(float(weights.mean()))
        return metrics

    # ---- the run -----------------------------------------------------------------------------------
    def resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"resume=true but {self.run_dir}/checkpoints holds no checkpoint")
        if is_distributed_checkpoint(path):
            if not self.parallel.distributed:
                raise RuntimeError(f"{path} is a distributed checkpoint: resume under torchrun (one process will do)")
            from . import dist_checkpoint
            self.state, _ = dist_checkpoint.load(path, self.model, self.old_model, self.optimizer, self.parallel.dp_rank)
        else:
            self.state, model_sd, old_sd = read_checkpoint(path, self.optimizer, self.parallel.rank, self.layout)
            load_full_state(self.model, model_sd)
            load_full_state(self.old_model, old_sd)
        if self.parallel.is_main:
            console(f"resumed from {path} (iteration {self.state.iteration}, step {self.state.step})")

    def checkpoint_format(self) -> str:
        fmt = self.cfg.checkpoint_format
        if fmt == "auto":
            sharded = self.cfg.parallel.distributed_optimizer
            return "dist" if self.parallel.distributed and (torch.cuda.is_available() or sharded) else "full"
        return fmt

    def save(self) -> Path:
        if self.checkpoint_format() == "dist":
            from . import dist_checkpoint
            path = checkpoint_root(self.run_dir) / f"iter_{self.state.iteration:06d}"
            dist_checkpoint.save(path, self.model, self.old_model, self.optimizer, self.state, to_dict(self.cfg),
                                 self.parallel.dp_rank)
            if self.parallel.is_main:
                point_latest(path)
            return path
        full = (gather_full_state(self.model), gather_full_state(self.old_model))
        return save_checkpoint(self.run_dir, self.state, full, self.model.config, self.optimizer, to_dict(self.cfg),
                               self.parallel.rank, self.layout)

    def run(self) -> list[dict]:
        cfg, main = self.cfg, self.parallel.is_main
        if cfg.resume:
            self.resume()
        logger = MetricsLogger(self.run_dir, cfg.log.tensorboard, self.state.iteration if cfg.resume else None) \
            if main else None
        window = profiling.ProfilerWindow(cfg.profile.start_step, cfg.profile.end_step)
        start = self.state.iteration + 1
        history = []
        bar = tqdm(range(start, cfg.iterations), desc="omninft", unit="it", disable=not (cfg.log.progress and main),
                   initial=start, total=cfg.iterations)
        try:
            for it in bar:
                window.step(it)
                metrics = self.iteration(it)
                history.append(metrics)
                if main:
                    logger.log(metrics)
                    console(format_line(metrics, self.reward_names))
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                    self.save()
        finally:
            window.close()
            bar.close()
            if logger is not None:
                logger.close()
        if history:
            path = self.save()
            if main:
                console(f"checkpoint: {path}")
        if main and cfg.log.plot and logger.path.stat().st_size:
            plot_rewards(logger.path, self.run_dir / "rewards.png", self.reward_names)
        return history
