"""`omninft train | sample | eval | encode-prompts | convert | reward-server`.

    omninft train [--config FILE] [--resume] [key=value ...]   e.g. omninft train iterations=2 seed=0 run_dir=out
    omninft sample [--prompt TEXT ...] --out DIR [key=value ...]  rollouts, scored, saved as DIR/samples.safetensors
    omninft eval --checkpoint PATH [--config FILE] [key=value ...]  score task.eval_prompts with fixed noise
    omninft encode-prompts [--config FILE] [key=value ...]  fill text.cache (torchrun: sharded over ranks)
    omninft convert SRC DST --to {official,diffusers}
    omninft reward-server --reward NAME | --class pkg.mod:Class [--path P] --port N [key=value ...]  serve a reward

A mistake of the user's (a config key, a file, a checkpoint, a reward) is a `UserError`: caught here,
once, and printed as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .checkpoint.export import TARGETS, checkpoint_overrides, load_checkpoint_adapters, lora_checkpoint
from .config import load_config
from .errors import CheckpointError, ConfigError, UserError
from .policy import ema_update
from .rewards.server import MAX_BATCH, MAX_REQUEST_MB, MAX_WAIT_MS


def _train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, *(["resume=true"] if args.resume else [])])
    trainer = Trainer(cfg)
    history = trainer.run()
    if history and trainer.layout.is_main:
        first, last = history[0], history[-1]
        print(f"\nreward means, iteration {first['iteration']} -> {last['iteration']}:")
        for name in trainer.reward_names:
            a, b = first[f"reward/{name}"], last[f"reward/{name}"]
            print(f"  {name:18s} {a:+.4f} -> {b:+.4f}  ({b - a:+.4f})")
        print(f"metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import json

    from models.weights import atomic_save_file

    from .data import PromptRecord
    from .rewards import score_rewards
    from .trainer import Trainer

    overrides = list(args.overrides)
    if args.checkpoint:
        overrides += checkpoint_overrides(args.checkpoint)
    if args.prompt:  # the prompts to condition on are the ones given (and encoded if the cache lacks them)
        overrides.append("task.prompts=" + json.dumps(args.prompt, ensure_ascii=False))
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, for_training=False)
    if args.checkpoint and lora_checkpoint(args.checkpoint):
        load_checkpoint_adapters(args.checkpoint, trainer.model, trainer.old_model)
    ema_update(trainer.old_model, trainer.model, 0.0)  # sample the trained policy (EMA with eta 0: a copy)
    if args.prompt:
        prompts = [PromptRecord(p, p, p) for p in (p.strip() for p in args.prompt)]
    else:
        prompts = trainer.prompts_for(args.iteration)
    indices = list(range(len(prompts) * cfg.train.group_size))
    noise_video, noise_audio = trainer.initial_noise(args.iteration, prompts, indices)
    rollout, _, _ = trainer.rollout(args.iteration, prompts, indices)
    keys = trainer.sample_keys(args.iteration, prompts, indices)
    writers = _sample_decoders(args.media, trainer)  # decoders for the media files, if any
    if writers is not None:
        trainer.decoders = writers
    media = trainer.decode(rollout, keys, {"frames", "waveform"} if writers else trainer.media_parts)
    scores = score_rewards(trainer.rewards, media)
    for name, value in scores.items():
        print(f"{name:18s} mean {float(value.mean()):+.4f} std {float(value.std(unbiased=False)):.4f}")
    out = Path(args.out) / "samples.safetensors"
    tensors = {
        "noise/video": noise_video,
        "noise/audio": noise_audio,
        "latents/video": rollout.video,
        "latents/audio": rollout.audio,
        **{f"reward/{k}": v for k, v in scores.items()},
    }
    metadata = {
        "prompts": json.dumps(list(rollout.prompts)),
        "fps": json.dumps(rollout.fps),
        "video_grid": json.dumps(list(rollout.video_grid)),
        "sigmas": json.dumps([float(s) for s in trainer.sigmas]),
        "iteration": str(args.iteration),
    }
    if writers is not None:
        from .media import write_mp4, write_wav

        tensors.update(video=media.frames.float().cpu(), audio=media.waveforms.float().cpu())
        metadata["sample_rate"] = str(media.sample_rate)
        for i in range(media.num_samples):
            wave = media.waveforms[i].cpu()
            write_mp4(Path(args.out) / f"sample_{i:03d}.mp4", media.frames[i].cpu(), media.fps, wave, media.sample_rate)
            write_wav(Path(args.out) / f"sample_{i:03d}.wav", wave, media.sample_rate)
    atomic_save_file(tensors, out, metadata=metadata)
    print(f"wrote {len(rollout.prompts)} samples to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from models import load_model_weights

    from .checkpoint import full
    from .metrics import MetricsLogger
    from .trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, *checkpoint_overrides(args.checkpoint)])
    if cfg.task.eval_records() is None:
        raise ConfigError("omninft eval needs task.eval_prompts (a list or a .txt/.jsonl/.csv file)")
    trainer = Trainer(cfg, for_training=False)
    trainer.check_eval_layout()
    src = Path(args.checkpoint)
    if lora_checkpoint(src):  # both adapter sets: the old one is the EMA, for eval.policy=old
        load_checkpoint_adapters(src, trainer.model, trainer.old_model)
    elif src.is_dir() and full.is_full_checkpoint(src) and (src / full.MODEL_FILES[1]).is_file():
        load_model_weights(trainer.old_model, src / full.MODEL_FILES[1])  # the EMA, for eval.policy=old
    else:
        ema_update(trainer.old_model, trainer.model, 0.0)  # no EMA stored: the policy itself (eta 0: a copy)
    out = Path(args.out) if args.out else None
    if out is not None and trainer.layout.is_main:  # eval.json, and the media when the weights hold decoders
        trainer.logger = MetricsLogger(out, dataclasses.replace(cfg.log, wandb=False))
    metrics = trainer.evaluate(iteration=0)
    if trainer.layout.is_main:
        for name in trainer.reward_names:
            mean, std = metrics[f"eval/reward/{name}"], metrics[f"eval/reward_std/{name}"]
            print(f"{name:18s} mean {mean:+.4f} std {std:.4f}")
        if out is not None:
            trainer.logger.close()
            (out / "eval.json").write_text(json.dumps({"checkpoint": args.checkpoint, **metrics}, indent=2) + "\n")
            print(f"wrote {out / 'eval.json'}")
    return 0


def _sample_decoders(mode: str, trainer):
    """The decoders `omninft sample` writes media with: the trainer's, else (`--media auto|on`) those of
    `decode.source` or `model.init`. With `auto`, weights without decoders (a DiT-only file) mean latents
    only, said in one line; with `on` they are an error."""
    from .rewards.decode import Decoders, decode_source

    cfg = trainer.cfg
    if mode == "off":
        return None
    if importlib.util.find_spec("av") is None:
        if mode == "on":
            raise ConfigError('--media on needs PyAV: pip install -c .ci/constraints.txt -e ".[media]"')
        print("media: none (PyAV is not installed: the media extra); latents only")
        return None
    if trainer.decoders is not None and trainer.decoders.vae is not None and trainer.decoders.vocoder is not None:
        return trainer.decoders
    if mode == "auto" and cfg.decode.source is None and cfg.model.init is None:
        print("media: none (no decode.source or model.init holds the VAEs and vocoder); latents only")
        return None
    try:
        return Decoders(cfg.decode, decode_source(cfg.decode, cfg.model.init), trainer.device)
    except CheckpointError as e:
        if mode == "on":
            raise
        print(f"media: none ({str(e).splitlines()[0]}); latents only")
        return None


def _encode_prompts(args: argparse.Namespace) -> int:
    from .data.encode import encode_prompts

    cfg = load_config(args.config, args.overrides)
    report = encode_prompts(cfg.text, cfg.task.records(), cfg.task.eval_records(), cfg.model.init)
    rate = report.encoded / report.seconds if report.seconds > 0 else 0.0
    print(
        f"rank {report.rank}: encoded {report.encoded} of {report.texts} prompts in {report.seconds:.1f} s "
        f"({rate:.2f} prompts/s); {report.missing_after} still missing; "
        f"{report.bytes_per_prompt / 1024:.1f} KiB per prompt in {report.directory}"
    )
    return 0 if report.missing_after == 0 else 1


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint.export import convert

    print(convert(args.src, args.dst, args.to, args.dtype))
    return 0


def _reward_server(args: argparse.Namespace) -> int:
    from .rewards import server

    reward_args = server.parse_args(args.args, args.path)
    server.serve(
        lambda: server.build_reward(args.reward, args.cls, reward_args),
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        token_env=args.token_env,
        max_request_mb=args.max_request_mb,
        port_file=args.port_file,
    )
    return 0


def version() -> str:
    """The installed package's version (the source tree's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("omninft")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omninft", description="OmniNFT training for the LTX-2 audio-video DiT")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run OmniNFT training (default: the embedded tiny CPU task)")
    train.add_argument("--config", help="YAML config (e.g. configs/ltx2-19b.yaml); defaults are configs/tiny.yaml")
    train.add_argument(
        "--resume", action="store_true", help="continue from run_dir's latest checkpoint (= resume=true)"
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. iterations=2 train.group_size=4")
    train.set_defaults(func=_train)
    smp = sub.add_parser("sample", help="sample and score prompts (given, or one iteration's of the config)")
    smp.add_argument("--config")
    smp.add_argument("--checkpoint", help="model weights (= model.init: a file, or a diffusers pipeline folder)")
    smp.add_argument("--prompt", action="append", help="a prompt to sample (repeatable); default: the config's")
    smp.add_argument("--iteration", type=int, default=0, help="which iteration's noise (and prompts) to use")
    smp.add_argument("--out", required=True, help="directory for samples.safetensors (and sample_NNN.mp4/.wav)")
    smp.add_argument(
        "--media",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode to sample_NNN.mp4/.wav: auto = when the weights hold the VAEs and vocoder",
    )
    smp.add_argument("overrides", nargs="*")
    smp.set_defaults(func=_sample)
    ev = sub.add_parser("eval", help="sample task.eval_prompts with eval.* settings and fixed noise, and score them")
    ev.add_argument("--config")
    ev.add_argument("--checkpoint", required=True, help="weights (= model.init) or a training checkpoint directory")
    ev.add_argument("--out", help="directory for eval.json")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=_eval)
    enc = sub.add_parser(
        "encode-prompts",
        help="encode every training, eval and negative prompt into text.cache (resumable; shard with torchrun)",
    )
    enc.add_argument("--config")
    enc.add_argument("overrides", nargs="*", help="key=value overrides, e.g. text.cache=cache/ltx2")
    enc.set_defaults(func=_encode_prompts)
    conv = sub.add_parser(
        "convert",
        help="export a training checkpoint's policy (a LoRA run's adapters merged, or as a LoRA file), or rewrite "
        "DiT weights, in the official or diffusers layout",
    )
    conv.add_argument(
        "src", help="a checkpoints/iter_NNNNNN directory (full or distributed), or weights (file or diffusers folder)"
    )
    conv.add_argument("dst", help="the safetensors file to write")
    conv.add_argument(
        "--to",
        choices=TARGETS,
        required=True,
        help="official / diffusers: the whole DiT in that key layout (LoRA adapters merged); "
        "lora: a LoRA run's adapters as diffusion_model.*.lora_A/B.weight (diffusers, ltx-trainer, ComfyUI)",
    )
    conv.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="cast what is written (default: fp32 for LoRA files, the weights' own dtype otherwise)",
    )
    conv.set_defaults(func=_convert)
    srv = sub.add_parser(
        "reward-server",
        help="serve one reward over HTTP (batched), for configs that name it by url (rewards[i].url)",
    )
    which = srv.add_mutually_exclusive_group(required=True)
    which.add_argument("--reward", help="a built-in reward's name, e.g. clap")
    which.add_argument("--class", dest="cls", help="a custom reward, package.module:Class (a Reward subclass)")
    srv.add_argument("--path", help="shorthand for path=PATH (the reward's weights directory)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks a free one (printed)")
    srv.add_argument("--port-file", help="write the port here once listening (for scripts that pass --port 0)")
    srv.add_argument("--max-batch", type=int, default=MAX_BATCH, help="samples scored per call")
    srv.add_argument(
        "--max-wait-ms", type=float, default=MAX_WAIT_MS, help="how long a request waits for others to batch with"
    )
    srv.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_MB, help="the largest request body")
    srv.add_argument(
        "--token-env", help="environment variable holding the token clients must send (Authorization: Bearer)"
    )
    srv.add_argument("args", nargs="*", help="key=value arguments of the reward's constructor, e.g. axes.PC=-1")
    srv.set_defaults(func=_reward_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:  # the user's input, not a bug: one line, no traceback
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"omninft: {kind}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
