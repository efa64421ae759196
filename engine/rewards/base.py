"""What every reward is: a scorer of rollouts that declares the modality it judges, so routing (SPEC 2)
can send its advantage only to the branch(es) it is about, and what it reads (latents, decoded frames,
the waveform, the prompts), so the trainer decodes media only when some reward needs them; the typed
config entry that picks a built-in reward by name, a custom one by its import path, or one a reward server
hosts by its URL (engine.rewards.remote); and the call that scores a rollout with all of them, failing
loudly (never a silent 0).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import torch
from torch import Tensor

from models.latents import LatentGeometry

from ..errors import CheckpointError, ConfigError, RewardError, UserError, one_line
from ..fields import bounded, choice

MODALITIES = ("video", "audio", "av")
# What a reward may read: the clean latents, the decoded video frames, the decoded waveform, the prompts.
READS = frozenset({"latents", "frames", "waveform", "text"})
MEDIA = frozenset({"frames", "waveform"})  # what the trainer decodes only when some reward reads it
ON_FAILURE = ("stop", "skip")  # what the trainer does when a reward fails (RewardSpec.on_failure)


@dataclass(frozen=True)
class Rollout:
    """What rewards score: clean latents of N samples and, when some reward reads them, their decoded media."""

    video: Tensor  # (N, F*H*W, C) video latent tokens, f-major order (token index = (f*H + h)*W + w)
    audio: Tensor  # (N, T_a, C) audio latent tokens, 25 per second
    video_grid: tuple[int, int, int]  # (F, H, W) latent frames, height, width
    fps: float  # pixel frame rate
    prompts: tuple[str, ...]  # the prompt of each sample (length N)
    geometry: LatentGeometry = LatentGeometry()  # which pixel frames and audio samples each latent covers
    # The texts the video and audio rewards judge (the dataset's prompt_video / prompt_audio); () = `prompts`.
    video_prompts: tuple[str, ...] = ()
    audio_prompts: tuple[str, ...] = ()
    # Decoded media, None unless a reward reads them (`reads_media`):
    frames: Tensor | None = None  # (N, F_px, H_px, W_px, 3) RGB in [0, 1], `fps` frames per second
    waveforms: Tensor | None = None  # (N, channels, samples) in [-1, 1]
    sample_rate: int | None = None  # samples per second of `waveforms`

    def __post_init__(self) -> None:
        """Rejects inconsistent shapes here, so rewards can index the grid and the media without re-checking."""
        if self.video.ndim != 3 or self.audio.ndim != 3:
            raise ValueError(
                f"video and audio must be (N, tokens, C); got {tuple(self.video.shape)} and {tuple(self.audio.shape)}"
            )
        n = self.video.shape[0]
        f, h, w = self.video_grid
        if self.video.shape[1] != f * h * w:
            raise ValueError(
                f"video has {self.video.shape[1]} tokens but video_grid {self.video_grid} implies {f * h * w}"
            )
        if self.audio.shape[0] != n or len(self.prompts) != n:
            raise ValueError(
                f"sample counts disagree: video {n}, audio {self.audio.shape[0]}, prompts {len(self.prompts)}"
            )
        for name in ("video_prompts", "audio_prompts"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.prompts)
            elif len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} texts for {n} samples")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a finite number > 0, got {self.fps}")
        self._check_media(n)

    def _check_media(self, n: int) -> None:
        """Media shapes: frames (N, F_px, H_px, W_px, 3), waveforms (N, channels, samples) with a sample rate."""
        if self.frames is not None:
            shape = tuple(self.frames.shape)
            if self.frames.ndim != 5 or shape[0] != n or shape[-1] != 3 or 0 in shape:
                raise ValueError(f"frames must be (N={n}, frames, height, width, 3) with no empty axis, got {shape}")
            if not self.frames.is_floating_point():
                raise ValueError(f"frames must be floating point in [0, 1], got {self.frames.dtype}")
        if self.waveforms is not None:
            shape = tuple(self.waveforms.shape)
            if self.waveforms.ndim != 3 or shape[0] != n or 0 in shape:
                raise ValueError(f"waveforms must be (N={n}, channels, samples) with no empty axis, got {shape}")
            if not self.waveforms.is_floating_point():
                raise ValueError(f"waveforms must be floating point in [-1, 1], got {self.waveforms.dtype}")
        if (self.waveforms is None) != (self.sample_rate is None):
            raise ValueError("waveforms and sample_rate come together: give both or neither")
        rate = self.sample_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            raise ValueError(f"sample_rate must be an integer > 0 (Hz), got {rate!r}")

    @property
    def num_samples(self) -> int:
        """N, the batch size every score must match."""
        return self.video.shape[0]

    def head(self, k: int) -> Rollout:
        """The first `k` samples, latents and texts only (what is decoded again for media logging)."""
        return dataclasses.replace(
            self,
            video=self.video[:k],
            audio=self.audio[:k],
            prompts=self.prompts[:k],
            video_prompts=self.video_prompts[:k],
            audio_prompts=self.audio_prompts[:k],
            frames=None,
            waveforms=None,
            sample_rate=None,
        )

    def video_frames(self) -> Tensor:
        """Video latent as (N, F, H, W, C): the f-major token order makes this a plain reshape."""
        f, h, w = self.video_grid
        return self.video.reshape(self.num_samples, f, h, w, self.video.shape[-1])


def _check_weight(value: object, where: str) -> float:
    """Weights scale advantages; a non-positive or non-finite one would flip or poison them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_declarations(reward: type[Reward] | Reward) -> None:
    """ValueError unless a reward class (or instance) declares a non-empty `name`, a `modality` of MODALITIES
    and `reads` within READS: routing needs the modality, the decode step `reads`, logs and errors the name."""
    name = getattr(reward, "name", None)
    if not isinstance(name, str) or not name:
        cls = reward if isinstance(reward, type) else type(reward)
        raise ValueError(f"reward class {cls.__qualname__} must declare a non-empty string `name`, got {name!r}")
    modality = getattr(reward, "modality", None)
    if modality not in MODALITIES:
        raise ValueError(f"reward {name!r} has modality {modality!r}; expected one of {MODALITIES}")
    reads = reward.reads
    if not isinstance(reads, (set, frozenset)) or not reads or not reads <= READS:
        raise ValueError(f"reward {name!r} reads {reads!r}; expected a non-empty set of {sorted(READS)}")


class Reward(abc.ABC):
    """A scorer of rollouts, typed by the modality it judges so routing can target its advantage, and by what
    it reads (`reads`, a subset of READS) so the trainer decodes media only for the rewards that need them.

    A subclass takes its weight as `weight` and its config `args` as further keyword arguments, e.g.
    `__init__(self, weight=1.0, *, path)`; it loads what it needs (weights from local paths) there, so a bad
    path fails when the trainer builds the rewards, before any rollout.
    """

    name: str
    modality: str
    reads: frozenset[str] = frozenset({"latents"})
    # The smallest latent grid (frames, height, width) the reward can score: checked when the config is read.
    min_video_grid: tuple[int, int, int] = (1, 1, 1)
    # Scored by a server (engine.rewards.remote): blocking I/O the trainer may overlap in a background thread.
    remote: bool = False
    # What the trainer does when the reward fails (ON_FAILURE); build_rewards sets it from the config entry.
    on_failure: str = "stop"

    def __init__(self, weight: float = 1.0) -> None:
        _check_declarations(self)
        self.weight = _check_weight(weight, f"{self.name}.weight")

    @abc.abstractmethod
    def score(self, rollout: Rollout) -> Tensor:
        """(N,) float scores, higher is better."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modality={self.modality!r}, weight={self.weight})"


@dataclass
class RewardSpec:
    """One entry of the config's `rewards` list, one of:

    - a built-in reward by `name` (`{name: clap, args: {path: ...}}`) or a custom one by `class` (or `cls`),
      "package.module:Class" (a subclass of Reward), with the keyword arguments its constructor takes (`args`);
    - a reward hosted by `omninft reward-server` at `url` (one URL, or a list of replicas that share the load),
      `{name: clap, url: http://judge:8500}`: `name` names it here (metrics, errors; a built-in name must agree
      with the server's modality), the server holds its class and args. `timeout` (seconds per request),
      `retries` (of transient failures: connection errors, timeouts, HTTP 5xx; with exponential backoff, each
      retry on the next replica), `concurrency` (requests in flight from this process) and `token_env` (the
      environment variable holding the server's shared token: never the token itself, as configs are logged)
      apply to it alone. Checking the entry never connects; building it asks every replica for its /info.

    Every entry has the `weight` of its advantage and `on_failure`: when the reward raises (a remote one after
    its retries), `stop` ends the run naming the reward (default), `skip` makes the trainer drop that iteration
    and go on; a failed reward is never scored 0."""

    __config_hints__ = {"modality": "a reward's modality is its own and cannot be set"}
    __config_aliases__ = {"class": "cls"}  # `class:` as users write it; a Python keyword cannot be a field

    name: str | None = None
    weight: float = 1.0
    args: dict = field(default_factory=dict)
    cls: str | None = None
    url: str | list[str] | None = None
    timeout: float = bounded(0, None, default=60.0)
    retries: int = bounded(0, None, default=3)
    concurrency: int = bounded(1, None, default=4)
    token_env: str | None = None
    on_failure: str = choice(*ON_FAILURE, default="stop")


REGISTRY: dict[str, type[Reward]] = {}


def register(cls: type[Reward]) -> type[Reward]:
    """Class decorator: makes a reward buildable from a config entry by its `name`."""
    _check_declarations(cls)
    REGISTRY[cls.name] = cls
    return cls


def _import_class(path: str, where: str) -> type[Reward]:
    """The Reward subclass at "package.module:Class" (ConfigError naming `where` if it cannot be used)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where} must look like package.module:Class, got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ConfigError(f"{where} {path!r}: cannot import {module_name}: {one_line(e)}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where} {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Reward)):
        raise ConfigError(f"{where} {path!r} is not a subclass of engine.rewards.Reward")
    if inspect.isabstract(obj):
        raise ConfigError(f"{where} {path!r} is abstract (it must implement score)")
    try:
        _check_declarations(obj)
    except ValueError as e:
        raise ConfigError(f"{where} {path!r}: {e}") from e
    return obj


def _resolve(spec: RewardSpec, where: str) -> type[Reward]:
    """The class an entry names: a registered name or an import path, exactly one of them."""
    if (spec.name is None) == (spec.cls is None):
        raise ConfigError(
            f"{where} needs exactly one of name (a built-in reward: {', '.join(sorted(REGISTRY))}) "
            "or cls (a custom reward, package.module:Class)"
        )
    if spec.cls is not None:
        return _import_class(spec.cls, f"{where}.cls")
    if spec.name not in REGISTRY:
        raise ConfigError(f"{where}.name {spec.name!r} is unknown; available: {sorted(REGISTRY)}")
    return REGISTRY[spec.name]


def _check_spec(spec: RewardSpec, where: str) -> tuple[type[Reward], float]:
    """The entry's class and weight, with its args checked against the constructor's signature (no construction)."""
    cls = _resolve(spec, where)
    try:
        weight = _check_weight(spec.weight, f"{where}.weight")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    bad_keys = [k for k in spec.args if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{where}.args keys must be strings, got {bad_keys}")
    if "weight" in spec.args:
        raise ConfigError(f"{where}.args.weight: set the weight beside args ({where}.weight), not inside")
    try:
        inspect.signature(cls).bind(weight=weight, **spec.args)
    except TypeError as e:
        raise ConfigError(f"{where}.args do not fit {cls.name} ({cls.__module__}.{cls.__qualname__}): {e}") from e
    return cls, weight


def _is_server_url(url: object) -> bool:
    """Whether `url` looks like http(s)://host[:port][/prefix], a server's base URL (no query or fragment)."""
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, a malformed IPv6 host
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0 and not parts.query + parts.fragment


def _check_remote(spec: RewardSpec, where: str) -> float:
    """A remote entry's weight, the entry checked without connecting: a name, no cls or args (its
    server holds them), http(s)://host[:port][/prefix] URLs without repeats, and sane client settings."""
    if not isinstance(spec.name, str) or not spec.name:
        raise ConfigError(f"{where}: a remote reward (url) needs a name, which names it in metrics and errors")
    if spec.cls is not None or spec.args:
        raise ConfigError(
            f"{where}: a remote reward (url) is built by its server: give its class and args to "
            "`omninft reward-server`, not here"
        )
    urls = [spec.url] if isinstance(spec.url, str) else list(spec.url or ())
    if not urls:
        raise ConfigError(f"{where}.url must be a URL or a non-empty list of replica URLs")
    for url in urls:
        if not _is_server_url(url):
            raise ConfigError(f"{where}.url {url!r} must look like http://host:port (or https://)")
    if len(set(urls)) < len(urls):
        raise ConfigError(f"{where}.url lists a replica twice: {urls}")
    numbers_ok = (
        not isinstance(spec.timeout, bool)
        and isinstance(spec.timeout, numbers.Real)
        and math.isfinite(spec.timeout)
        and spec.timeout > 0
    )
    if not numbers_ok:
        raise ConfigError(f"{where}.timeout must be a finite number of seconds > 0, got {spec.timeout!r}")
    for key, least in (("retries", 0), ("concurrency", 1)):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{where}.{key} must be an integer >= {least}, got {value!r}")
    env = spec.token_env
    if env is not None and (not isinstance(env, str) or not env or "=" in env):
        raise ConfigError(f"{where}.token_env must name an environment variable (not the token), got {env!r}")
    try:
        return _check_weight(spec.weight, f"{where}.weight")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _checked(specs: Sequence[RewardSpec]) -> list[tuple[type[Reward] | None, float]]:
    """Each entry's class (None for a remote one) and weight, every entry checked (see check_rewards)."""
    if not specs:
        raise ConfigError(f"rewards must name at least one reward; available: {sorted(REGISTRY)}")
    checked: list[tuple[type[Reward] | None, float]] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.url is not None:
            cls, weight = None, _check_remote(spec, f"rewards[{i}]")
        else:
            cls, weight = _check_spec(spec, f"rewards[{i}]")
        if spec.on_failure not in ON_FAILURE:
            raise ConfigError(
                f"rewards[{i}].on_failure must be one of {', '.join(ON_FAILURE)}; got {spec.on_failure!r}"
            )
        name = spec.name if cls is None else cls.name
        if name in seen:
            raise ConfigError(f"rewards[{i}]: {name!r} is a duplicate; each reward may appear once")
        seen.add(name)
        checked.append((cls, weight))
    return checked


def check_rewards(specs: Sequence[RewardSpec]) -> None:
    """Everything about the config's `rewards` list that can be checked without building a reward (which may
    load a model) or connecting to a server: each entry names one class (imported for `cls`), a valid weight and
    args its constructor accepts, or is a well-formed remote entry (`url`), and no reward appears twice.
    ConfigError naming the entry (`rewards[i]...`). The config loader calls this; the trainer calls
    `build_rewards`."""
    _checked(specs)


def check_video_grid(specs: Sequence[RewardSpec], grid: Sequence[int]) -> None:
    """ConfigError naming the first reward of `specs` that cannot score latents of `grid` (F, H, W). A remote
    reward's server checks each request instead (HTTP 400): the config check does not connect."""
    for i, (cls, _) in enumerate(_checked(specs)):
        if cls is None:
            continue
        need = cls.min_video_grid
        if any(g < n for g, n in zip(grid, need)):
            raise ConfigError(
                f"rewards[{i}]: {cls.name} needs task.video_grid of at least {list(need)} (latent frames, rows, "
                f"columns); got {list(grid)}"
            )


def build_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    """The rewards of the config's `rewards` list, constructed with their args, or connected to their servers
    (engine.rewards.remote.RemoteReward, which asks every replica for its /info), each with its entry's
    `on_failure`. ConfigError naming the entry (`rewards[i]...`); a reward's own UserError, e.g. a missing
    weights path or an unreachable server, passes through as it names it.

    A reward's modality is part of what it measures, so a spec cannot override it."""
    rewards: list[Reward] = []
    for i, ((cls, weight), spec) in enumerate(zip(_checked(specs), specs)):
        try:
            if cls is None:
                from .remote import RemoteReward  # stdlib HTTP only, but not needed by a local reward set

                reward = RemoteReward.from_spec(spec, weight)
            else:
                reward = cls(weight=weight, **spec.args)
        except UserError:
            raise
        except Exception as e:  # a custom reward's constructor may reject its args in any way
            raise ConfigError(f"rewards[{i}]: building {spec.name or cls.name} raised {one_line(e)}") from e
        reward.on_failure = spec.on_failure
        rewards.append(reward)
    return rewards


def reads_media(rewards: Iterable[Reward]) -> set[str]:
    """Which media ("frames", "waveform") some reward reads: the trainer decodes the video / audio only then."""
    return set().union(*(r.reads for r in rewards)) & MEDIA


def require_package(reward: str, module: str, install: str) -> ModuleType:
    """The module `module`, imported; RewardError naming the reward and how to `install` it if it is absent
    (reward models come from optional packages: the core engine runs without them)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"reward {reward!r} needs {module}, which does not import ({e}): {install}") from e


def local_dir(reward: str, path: str | Path, required: Sequence[str]) -> Path:
    """`path` as a directory holding every file of `required` (CheckpointError naming the reward, the path and
    what is missing): loaders get local paths only, and a hub loader given a missing path would try the network."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"reward {reward!r}: {path} is not a directory")
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"reward {reward!r}: {path} lacks {', '.join(missing)}")
    return directory


def score_rewards(rewards: Sequence[Reward], rollout: Rollout) -> dict[str, Tensor]:
    """Runs every reward under torch.no_grad; returns name -> (N,) float32.

    A reward that reads media the rollout lacks, raises, returns a wrong shape, or returns any
    non-finite value raises RewardError naming the reward (chained from the original exception). It
    never substitutes a 0: a silently zeroed reward would still shift group advantages and train on garbage.
    """
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward names must be unique, got duplicates {duplicates}")
    present = {"frames": rollout.frames is not None, "waveform": rollout.waveforms is not None}
    for reward in rewards:  # all checked before any model runs
        lacking = sorted(m for m in reward.reads & MEDIA if not present[m])
        if lacking:
            raise RewardError(
                f"reward {reward.name!r} reads {' and '.join(lacking)}, but the rollout has none: "
                "decode what reads_media(rewards) names"
            )

    n = rollout.num_samples
    scores: dict[str, Tensor] = {}
    with torch.no_grad():
        for reward in rewards:
            try:
                out = reward.score(rollout)
            except RewardError:  # names the reward already (a remote reward's failure after its retries)
                raise
            except Exception as exc:
                raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(out, Tensor):
                raise RewardError(f"reward {reward.name!r} returned {type(out).__name__}, expected a Tensor")
            if out.shape != (n,):
                raise RewardError(f"reward {reward.name!r} returned shape {tuple(out.shape)}, expected ({n},)")
            out = out.float()
            if not torch.isfinite(out).all():
                raise RewardError(f"reward {reward.name!r} returned non-finite scores: {out.tolist()}")
            scores[reward.name] = out
    return scores
