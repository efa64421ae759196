"""The rollout half of the OmniNFT loop (SPEC section 6): prompts -> samples of the old policy, chunk by chunk
-> decoded media (only for rewards that read them) -> scores (remote rewards in the background while the next
chunk samples) -> every rank's reward failures agreed; and evaluation, the same path with the held-out prompts,
its own noise and `eval.*`. `engine.trainer.Trainer` takes these phases from `RolloutPhases` and adds the
advantages, the training steps, the EMA, checkpoints and logging.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import profiling
from .algorithm.reweighting import V2AMassRecorder, reference_blocks, reference_steps
from .data import PromptRecord, prompts_for
from .errors import ConfigError, RewardError
from .fields import bounded, choice
from .guard import NonFiniteError
from .metrics import console
from .noise import rollout_noise
from .parallel import PipelinedForward
from .rewards import Rollout, score_rewards
from .rewards.desync import desync_from_scores
from .rewards.scoring import Scores, Scoring, join_rollouts
from .sampler import SamplerConfig, sample


@dataclass
class RolloutPlan:
    """Which policy samples, with which sampler settings and noise keys (`Trainer.plan`)."""

    model: torch.nn.Module
    sampler: SamplerConfig
    sigmas: Tensor
    group_size: int  # samples per prompt
    seed: int
    noise_key: str | None  # replaces the iteration in the noise keys; None: the iteration


@dataclass
class EvalConfig:
    """`eval.*`: sampling the held-out `task.eval_prompts` with fixed noise and scoring every reward."""

    every: int = bounded(0, None, default=0)  # iterations between evaluations; 0 = only `omninft eval`
    samples_per_prompt: int = bounded(1, None, default=2)
    seed: int = 0  # the evaluation noise's own seed (the same noise at every evaluation)
    policy: str = choice("model", "old", default="model")  # the trained policy, or its EMA (the old policy)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # steps, CFG, STG of evaluation


class RolloutPhases:
    """The rollout half of an iteration, for `engine.trainer.Trainer` (which holds the config, layout,
    policies, conditioning, pipeline, decoders and rewards these read): the prompts, the noise keys, sampling
    in chunks, decoding, scoring, reward failures, media logging, and evaluation on held-out prompts."""

    def negative_prompt(self, record: PromptRecord) -> str:
        """The record's own negative prompt, else `text.negative_prompt`."""
        return self.cfg.text.negative_prompt if record.negative_prompt is None else record.negative_prompt

    # ---- one iteration, phase by phase -------------------------------------------------------------
    def prompts_for(self, iteration: int) -> list[PromptRecord]:
        """The prompts of iteration `iteration`: the next `prompts_per_iteration` of the dataset,
        reshuffled every epoch from the seed (engine.data.prompts_for), so a resumed run sees the same."""
        cfg = self.cfg
        return prompts_for(cfg.task.records(), cfg.seed, iteration, cfg.train.prompts_per_iteration)

    def plan(self, evaluation: bool) -> RolloutPlan:
        """How rollouts are drawn: for training, the old policy with `sampler.*`, noise keyed by (seed,
        iteration) and groups of `train.group_size`; for evaluation, `eval.policy` with `eval.sampler.*`,
        groups of `eval.samples_per_prompt` and noise keyed by `eval.seed` alone (every evaluation sees
        the same noise, and none of training's random streams is touched)."""
        cfg = self.cfg
        if not evaluation:
            return RolloutPlan(self.old_model, cfg.sampler, self.sigmas, cfg.train.group_size, cfg.seed, None)
        model = self.model if cfg.eval.policy == "model" else self.old_model
        return RolloutPlan(
            model, cfg.eval.sampler, cfg.eval.sampler.sigmas(), cfg.eval.samples_per_prompt, cfg.eval.seed, "eval"
        )

    def sample_keys(
        self, iteration: int, prompts: list[PromptRecord], indices: list[int], evaluation: bool = False
    ) -> list[tuple]:
        """(seed, iteration or "eval", prompt, sample) of samples `indices` (sample i is number i % G of
        prompt i // G): what every random stream of a sample is keyed by (engine.noise)."""
        plan = self.plan(evaluation)
        key, g = iteration if plan.noise_key is None else plan.noise_key, plan.group_size
        return [(plan.seed, key, prompts[i // g].prompt, i % g) for i in indices]

    def initial_noise(
        self, iteration: int, prompts: list[PromptRecord], indices: list[int], evaluation: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The rollout noise of samples `indices`: packed video (n, F*H*W, C) and audio (n, T_a, C), on the CPU."""
        mc = self.model.config
        f, h, w = self.grid
        noise = [
            rollout_noise(*key, (f * h * w, mc.in_channels), (self.num_audio, mc.audio_in_channels))
            for key in self.sample_keys(iteration, prompts, indices, evaluation)
        ]
        return torch.stack([n[0] for n in noise]), torch.stack([n[1] for n in noise])

    def decode(self, rollout: Rollout, keys: list[tuple], parts: set[str]) -> Rollout:
        """The rollout with its decoded `parts` ("frames", "waveform") attached, on this rank's device
        (where the rewards run); `keys` (sample_keys) key a timestep-conditioned VAE's decode noise."""
        if not parts:
            return rollout
        frames = waveforms = sample_rate = None
        if "frames" in parts:
            frames = self.decoders.frames(rollout.video, rollout.video_grid, noise_keys=keys).to(self.device)
        if "waveform" in parts:
            waveforms = self.decoders.waveforms(rollout.audio).to(self.device)
            sample_rate = self.decoders.sample_rate
        return dataclasses.replace(rollout, frames=frames, waveforms=waveforms, sample_rate=sample_rate)

    def save_media(self, kind: str, step: int, rollout: Rollout, keys: list[tuple]) -> None:
        """The first `log.media_samples` samples of `rollout`, decoded with the decoders this run loaded
        (video, audio or both), as mp4 / wav and to TensorBoard (main rank only; no collectives)."""
        k = min(self.cfg.log.media_samples, rollout.num_samples)
        parts = {
            part for part, module in (("frames", self.decoders.vae), ("waveform", self.decoders.vocoder)) if module
        }
        media = self.decode(rollout.head(k), keys[:k], parts)
        self.logger.log_media(
            kind,
            step,
            [
                dict(
                    frames=None if media.frames is None else media.frames[i].cpu(),
                    fps=rollout.fps,
                    waveform=None if media.waveforms is None else media.waveforms[i].cpu(),
                    sample_rate=media.sample_rate,
                )
                for i in range(k)
            ],
        )

    def check_eval_layout(self) -> None:
        """Evaluation samples are spread evenly over the data-parallel ranks."""
        n = len(self.cfg.task.eval_records() or ()) * self.cfg.eval.samples_per_prompt
        if n % self.layout.dp:
            raise ConfigError(
                f"the {n} evaluation samples (task.eval_prompts x eval.samples_per_prompt) must divide evenly "
                f"over the {self.layout.dp} data-parallel ranks"
            )

    def check_finite(self, rollout: Rollout, what: str) -> None:
        """Stops every rank when any rank's rollout has non-finite latents, before a reward is blamed."""
        broken = not (rollout.video.isfinite().all() and rollout.audio.isfinite().all())
        if self.layout.max_over("world", float(broken)):
            raise NonFiniteError(f"{what} has non-finite latents")

    def sync(self) -> None:
        """Waits for the device, so that a host clock read times the work queued before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rollout(
        self, iteration: int, prompts: list[PromptRecord], indices: list[int], evaluation: bool = False
    ) -> tuple[Rollout, tuple[Tensor, Tensor], Tensor | None]:
        """Samples `indices` of the iteration (sample i is number i % G of prompt i // G) as `plan`
        says; returns them as a Rollout (latents on the CPU), their (video, audio)
        text contexts and their V2A scores (training only: on the device, summed over stages and
        averaged over heads of all ranks)."""
        cfg, mc, layout, plan = self.cfg, self.model.config, self.layout, self.plan(evaluation)
        f, h, w = self.grid
        records = [prompts[i // plan.group_size] for i in indices]
        texts = [r.prompt for r in records]
        on = {"device": self.device, "dtype": self.dtype}
        video_noise, audio_noise = (n.to(**on) for n in self.initial_noise(iteration, prompts, indices, evaluation))
        ctx = self.conditioning.contexts(texts, **on)
        guided = plan.sampler.cfg_video != 1.0 or plan.sampler.cfg_audio != 1.0
        uncond = self.conditioning.contexts([self.negative_prompt(r) for r in records], **on) if guided else None
        recorder = None
        if cfg.reweight.mode != "off" and not evaluation:
            recorder = V2AMassRecorder(
                steps=reference_steps(cfg.sampler.steps, cfg.reweight.first_step, cfg.reweight.last_step),
                blocks=reference_blocks(mc.num_layers, cfg.reweight.first_deep_block),
                rows=len(indices),
                num_video_tokens=f * h * w,
                device=self.device,
            )
        result = sample(
            PipelinedForward(self.pipeline, plan.model, cfg.train.micro_batch_size),
            video_noise,
            audio_noise,
            ctx[0],
            ctx[1],
            self.grid,
            cfg.task.fps,
            plan.sigmas,
            plan.sampler.cfg_video,
            plan.sampler.cfg_audio,
            uncond,
            v2a_recorder=recorder,
            stg_scale=plan.sampler.stg_scale,
            stg_blocks=plan.sampler.stg_blocks,
        )
        rollout = Rollout(
            video=result.video.float().cpu(),
            audio=result.audio.float().cpu(),
            video_grid=self.grid,
            fps=cfg.task.fps,
            prompts=tuple(texts),
            video_prompts=tuple(r.prompt_video for r in records),
            audio_prompts=tuple(r.prompt_audio for r in records),
            geometry=self.geometry,
        )
        score = None if recorder is None else recorder.score()
        if score is not None:  # a rank saw its heads of its stage's blocks
            score = layout.sum_over("pp", layout.mean_over("tp", score))
        return rollout, ctx, score

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict[str, float]:
        """Every reward's mean and std over the held-out `task.eval_prompts` (`eval/...` metrics), the
        samples spread over the data-parallel ranks."""
        prompts = list(self.cfg.task.eval_records())
        n = len(prompts) * self.cfg.eval.samples_per_prompt
        local = list(range(self.layout.dp_rank, n, self.layout.dp))
        self.model.eval()
        rollout, _, _ = self.rollout(iteration, prompts, local, evaluation=True)
        self.check_finite(rollout, f"the evaluation rollout at iteration {iteration}")
        keys = self.sample_keys(iteration, prompts, local, evaluation=True)
        if self.logger is not None and self.decoders is not None and importlib.util.find_spec("av") is not None:
            self.save_media("eval", iteration, rollout, keys)
        rollout = self.decode(rollout, keys, self.media_parts)
        scores = {
            k: self.layout.gather_samples(v.to(self.device), local, n)
            for k, v in score_rewards(self.rewards, rollout).items()
        }
        metrics = {}
        for name, value in scores.items():
            metrics[f"eval/reward/{name}"] = float(value.mean())
            metrics[f"eval/reward_std/{name}"] = float(value.std(unbiased=False))
        if "desync" in scores:  # the paper's sync metric: mean |offset| in seconds, from each sample's reward
            seconds = desync_from_scores(scores["desync"])
            metrics["eval/desync"], metrics["eval/desync_std"] = (
                float(seconds.mean()),
                float(seconds.std(unbiased=False)),
            )
        return metrics

    def sample_and_score(
        self, iteration: int, prompts: list[PromptRecord], local: list[int], times: dict
    ) -> tuple[Rollout, tuple[Tensor, Tensor], Tensor | None, Scores]:
        """Samples this rank's rollout chunk by chunk (`train.rollout_chunk`), decoding and submitting each
        chunk to the rewards as soon as it is sampled (remote rewards score it while the next chunk samples),
        then waits for every score. Returns the whole rollout, its contexts, V2A scores and the Scores;
        fills `times` (time/rollout, time/decode, time/reward, time/reward_wait, time/reward_hidden,
        time/reward/<name>)."""
        size = self.cfg.train.rollout_chunk or len(local)
        scoring = Scoring(self.rewards, self.reward_pool, self.sync)
        parts, t_rollout, t_decode, t_local = [], 0.0, 0.0, 0.0
        for start in range(0, len(local), size):
            chunk = local[start : start + size]
            t = time.perf_counter()
            with profiling.nvtx_range(profiling.ROLLOUT):
                part = self.rollout(iteration, prompts, chunk)
            t_rollout += time.perf_counter() - t
            self.check_finite(part[0], f"the old policy's rollout at iteration {iteration}")
            t = time.perf_counter()
            with profiling.nvtx_range(profiling.DECODE):
                scored = self.decode(part[0], self.sample_keys(iteration, prompts, chunk), self.media_parts)
                self.sync()
            t_decode += time.perf_counter() - t
            t = time.perf_counter()
            with profiling.nvtx_range(profiling.REWARD):
                scoring.submit(scored)  # the media are freed once the chunk's rewards have them
            t_local += time.perf_counter() - t
            parts.append(part)
        with profiling.nvtx_range(profiling.REWARD):
            scores = scoring.gather()
        rollout = join_rollouts([p[0] for p in parts])
        ctx = tuple(torch.cat([p[1][k] for p in parts]) for k in (0, 1))
        v2a = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        times.update({"time/rollout": t_rollout, "time/decode": t_decode, "time/reward": t_local + scores.wait})
        times.update({"time/reward_wait": scores.wait, "time/reward_hidden": scores.hidden})
        times.update({f"time/reward/{name}": seconds for name, seconds in scores.seconds.items()})
        return rollout, ctx, v2a, scores

    def reward_verdict(self, iteration: int, scores: Scores) -> bool:
        """Every rank's reward failures, agreed: raises the RewardError when a failed reward (on any rank) has
        `on_failure: stop` (the default); True when the iteration is to be dropped (every failed reward has
        `on_failure: skip`); False when every reward scored everything."""
        policy = {r.name: getattr(r, "on_failure", "stop") for r in self.rewards}
        stop = [name for name in scores.failures if policy[name] == "stop"]
        verdict = self.layout.max_over("world", 2.0 if stop else float(bool(scores.failures)))
        last = f"the last checkpoint (iteration {self.state.iteration}) is intact" if self.state.iteration >= 0 else ""
        if verdict == 2:
            cause = str(scores.failures[stop[0]]) if stop else "a reward failed on another rank"
            raise RewardError(f"iteration {iteration}: {cause}; the run stops" + (f", {last}" if last else ""))
        if verdict == 1:
            self.state.skipped_iterations += 1
            if self.layout.is_main:
                why = "; ".join(str(e) for e in scores.failures.values()) or "a reward failed on another rank"
                console(f"warning: iteration {iteration} skipped (on_failure: skip): {why}")
        return verdict == 1
