"""Per-iteration metrics: console line, `metrics.jsonl`, TensorBoard, and the reward-curve PNG."""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import ConfigError, DataError
from .fields import bounded, choice

log = logging.getLogger(__name__)


@dataclass
class LogConfig:
    """`log.*`: what a run writes besides metrics.jsonl."""

    tensorboard: bool = True
    progress: bool = True
    plot: bool = True
    # Weights & Biases (pip install wandb): offline by default, into run_dir/wandb (`wandb sync` uploads it).
    wandb: bool = False
    wandb_project: str = "omninft"
    wandb_mode: str = choice("offline", "online", default="offline")
    # Decoded rollouts saved as run_dir/media/<tag>/sample_NNN.mp4 (+ .wav) and to TensorBoard, every
    # `media_every` iterations (0 = never), the first `media_samples` of the main rank's share.
    media_every: int = bounded(0, None, default=0)
    media_samples: int = bounded(1, None, default=2)

    def __post_init__(self) -> None:
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("log.wandb=true needs the wandb package (pip install wandb), which is not installed")


class MetricsLogger:
    """Appends one JSON object per iteration. On resume it drops the lines past the checkpoint (and a
    last line cut short by a crash mid-write), and TensorBoard purges the steps past it, so both read
    as if the run had never stopped."""

    def __init__(
        self, run_dir: str | Path, log: LogConfig, resume_after: int | None = None, config: dict | None = None
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["iteration"] <= resume_after]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.writer = self.wandb = None
        if log.wandb:
            self.wandb = _wandb_run(Path(run_dir), log, config or {})
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_after is None else resume_after + 1
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "iteration"}, step=metrics["iteration"])
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, metrics["iteration"])
            self.writer.flush()

    def log_media(self, kind: str, step: int, media: list[dict]) -> list[Path]:
        """Writes each sample's `frames` (F, H, W, 3) in [0, 1] at `fps` (or None) with its `waveform`
        (channels, samples) at `sample_rate` (or None) as run_dir/media/<kind>_<step>/sample_NNN.mp4 and
        .wav, and to TensorBoard as `<kind>/sample_N` at `step`. `kind` is "train" or "eval"."""
        from .media import log_tensorboard_media, write_mp4, write_wav

        folder, written = self.path.parent / "media" / f"{kind}_{step:06d}", []
        for k, m in enumerate(media):
            audio = (m["waveform"], m["sample_rate"]) if m["waveform"] is not None else (None, None)
            if m["frames"] is not None:
                written.append(write_mp4(folder / f"sample_{k:03d}.mp4", m["frames"], m["fps"], *audio))
            if m["waveform"] is not None:
                written.append(write_wav(folder / f"sample_{k:03d}.wav", *audio))
            if self.writer is not None and m["frames"] is not None:
                log_tensorboard_media(self.writer, f"{kind}/sample_{k}", m["frames"], m["fps"], step, *audio)
            elif self.writer is not None:  # audio only: TensorBoard's summaries are mono
                self.writer.add_audio(f"{kind}/sample_{k}/audio", m["waveform"].mean(0), step, m["sample_rate"])
        if self.writer is not None:
            self.writer.flush()
        return written

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(run_dir: Path, log: LogConfig, config: dict):
    """The W&B run of `run_dir`: its id is kept in run_dir/wandb_id, so a resumed run continues it."""
    import wandb

    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    return wandb.init(project=log.wandb_project, name=run_dir.name, dir=str(run_dir), mode=log.wandb_mode,
                      id=id_file.read_text().strip(), resume="allow", config=config)  # fmt: skip


def format_line(m: dict, reward_names: list[str]) -> str:
    rewards = " ".join(f"{n}={m[f'reward/{n}']:+.4f}±{m[f'reward_std/{n}']:.3f}" for n in reward_names)
    return (
        f"iter {m['iteration']:4d} | loss {m['loss']:.4f} (v {m['loss/video']:.4f} a {m['loss/audio']:.4f}) "
        f"| {rewards} | adv v {m['adv/video_mean']:+.2f}±{m['adv/video_std']:.2f} "
        f"a {m['adv/audio_mean']:+.2f}±{m['adv/audio_std']:.2f} | gnorm {m['grad_norm']:.3f} "
        f"| {m['time/iteration']:.2f}s"
    )


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short (a crash while writing it) is dropped with a
    warning, a damaged line before it is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise DataError(
                    f"{path}: line {i + 1} is not JSON ({e.msg}); only a cut-short last line is dropped"
                ) from e
            log.warning("%s: dropped its last line, cut short by a crash: %r", path, line[:80])
    return rows


def plot_rewards(metrics_path: str | Path, png_path: str | Path, reward_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if not r.get("skipped")]  # skipped iterations have no scores
    its = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, len(reward_names), figsize=(4 * len(reward_names), 3), squeeze=False)
    for ax, name in zip(axes[0], reward_names):
        mean = [r[f"reward/{name}"] for r in rows]
        std = [r[f"reward_std/{name}"] for r in rows]
        ax.plot(its, mean)
        ax.fill_between(its, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def console(message: str) -> None:
    """Prints without breaking an active progress bar."""
    tqdm.write(message)
