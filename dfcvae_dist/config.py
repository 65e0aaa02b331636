"""Typed run configuration: dataclasses <- YAML file in configs/ <- `key.sub=value` overrides.

Every option has a type, a default and a help text (the `help` metadata). Loading checks unknown keys,
types, choices and ranges and names the offending key and its source (file or command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfcvae_dist.errors import UserError

VGG_LAYER_NAMES = [
    f"relu{block}_{i}"
    for block, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
    for i in range(1, n + 1)
]


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A config field: default, help text and optional checks (choices=, min=, max=, items=)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, **checks}, **kw)


@dataclass
class DataConfig:
    shards: str = opt("data/shards/paper-64", "Manifest directory written by tools/make_shards.py, or a "
                      "WebDataset URL pattern (braces, pipe:, http) for the training split.")
    val_shards: str | None = opt(None, "URL pattern of the validation split when `shards` is a pattern.")
    num_workers: int = opt(1, "DataLoader worker processes per rank.", min=0)
    shuffle_buffer: int = opt(1000, "Samples in each worker's shuffle buffer.", min=0)
    num_samples: int | None = opt(None, "Training samples per epoch when `shards` is a pattern (a manifest "
                                  "knows its own).", min=1)
    skip_corrupt: bool = opt(False, "Skip undecodable samples (counted in MLflow) instead of stopping.")


@dataclass
class ModelConfig:
    name: str = opt("dfcvae", "Model: dfcvae (feature perceptual loss), pvae (pixel loss) or dcgan.",
                    choices=["dfcvae", "pvae", "dcgan"])
    image_size: int = opt(64, "Square input/output size: 64 is the paper's, 128 the released code's variant, "
                          "32 a small size for tests and demos.", choices=[32, 64, 128])
    latent_dim: int = opt(100, "Size of z.", min=1)
    base_channels: int = opt(32, "Channels of the first encoder block, doubled per block (paper: 32); "
                             "DCGAN: the discriminator's first block (Radford et al.: 64).", min=1)
    init: str = opt("normal", "Weight init: normal (N(0, 0.02) convolutions, as the released code) or "
                    "default (PyTorch's).", choices=["normal", "default"])


@dataclass
class LossConfig:
    layers: list[str] = opt(["relu1_2", "relu2_1", "relu3_1"], "VGG19 layers of the feature perceptual "
                            "loss ('123' of the paper; '345' is relu3_1, relu4_1, relu5_1).",
                            items=VGG_LAYER_NAMES)
    layer_weights: list[float] | None = opt(None, "Optional weight per layer (default 1 each).")
    alpha: float = opt(1.0, "Weight of the KL divergence (paper: 1).", min=0.0)
    beta: float = opt(0.8, "Weight of the reconstruction loss (paper: 0.8).", min=0.0)
    feature_scale: float = opt(57.6, "Multiplier on VGG features before the distance. 57.6 = 255 x mean "
                               "ImageNet std maps torchvision's normalised input to the Caffe BGR 0-255 "
                               "scale the paper's alpha/beta were tuned on (README: 'Feature scale').",
                               min=0.0)
    vgg_weights: str = opt("imagenet", "imagenet (torchvision weights API), random (seeded; tests and "
                           "offline demos) or a path to a local VGG19 state-dict file.")
    vgg_dtype: str = opt("auto", "Loss-network dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.",
                         choices=["auto", "fp32", "fp16", "bf16"])
    vgg_seed: int = opt(0, "Seed of the random VGG19 weights (vgg_weights=random).")
    compile: bool = opt(False, "torch.compile the loss network and its distances (fuses the elementwise work "
                        "around the convolutions; see README, Performance). Compiling takes ~20 s at start.")


@dataclass
class OptimConfig:
    lr: float = opt(5e-4, "Adam learning rate (paper: 5e-4; DCGAN: 2e-4).", min=0.0)
    beta1: float = opt(0.9, "Adam beta1 (DCGAN: 0.5).", min=0.0, max=1.0)
    beta2: float = opt(0.999, "Adam beta2.", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "Adam weight decay.", min=0.0)
    lr_decay_per_epoch: float = opt(0.5, "Multiply lr by this after every epoch (paper: 0.5).",
                                    min=0.0, max=1.0)
    grad_clip: float | None = opt(None, "Clip the global gradient norm to this value.", min=0.0)


@dataclass
class TrainConfig:
    run_dir: str = opt("runs/default", "Directory for checkpoints, the resolved config and markers.")
    epochs: int = opt(5, "Epochs over the training split (paper: 5).", min=1)
    max_steps: int | None = opt(None, "Optimizer steps in total; overrides epochs when set.", min=1)
    batch_size: int = opt(64, "Per-rank micro-batch size.", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", min=1)
    seed: int = opt(0, "Seed of model init, data order and sampling.")
    resume: str = opt("auto", "auto (newest complete checkpoint, if any), none, or a checkpoint path.")
    mixed_precision: str = opt("no", "Autocast of the trained model through accelerate.",
                               choices=["no", "fp16", "bf16"])
    channels_last: bool = opt(True, "Channels-last memory format for the model, loss network and batches "
                               "(bench: +32% training img/s on a 2-core CPU).")
    val_every_steps: int = opt(0, "Validation loss on the val split every N steps (0: off).", min=0)
    val_batches: int = opt(4, "Batches per rank in one validation pass.", min=1)
    threads: int | None = opt(None, "Torch threads per process (default: cores / local processes).", min=1)
    on_nonfinite: str = opt("stop", "NaN/Inf loss: stop (error naming step and rank) or skip the step.",
                            choices=["stop", "skip"])
    collective_timeout_s: int = opt(300, "Timeout of collectives; a dead rank ends the job after it.", min=1)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(500, "Save a checkpoint every N optimizer steps (0: only at end and on stop).",
                           min=0)
    keep: int = opt(3, "Keep the newest K checkpoints.", min=1)


@dataclass
class LogConfig:
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                   "MLflow's own sqlite:///mlflow.db).")
    experiment: str = opt("dfcvae", "MLflow experiment name.")
    run_name: str | None = opt(None, "MLflow run name (default: the run directory's name).")
    every_steps: int = opt(10, "Log metrics every N optimizer steps.", min=1)
    image_every_steps: int = opt(200, "Log image grids every N steps (0: only at the end).", min=0)
    on_unavailable: str = opt("error", "Tracking server unreachable at start: error, or warn and train "
                              "untracked.", choices=["error", "warn"])
    enabled: bool = opt(True, "Log to MLflow at all.")
    progress_every_s: float = opt(30.0, "In a job log (stderr not a terminal): a plain progress line at the first "
                                  "log step after every N seconds (0: at every log step).", min=0.0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, each checked against the dataclasses."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as err:
            raise UserError(f"cannot read config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML: {err}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                _check_section(section, str(path))
                raise UserError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"command-line override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set(cfg, key.strip(), value, f"command-line override '{item}'")
    return cfg


def _check_section(section: str, source: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if section not in fields:
        raise UserError(f"{source}: unknown section '{section}'{_suggest(section, fields)}")
    return fields[section]


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    _check_section(section, source)
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise UserError(f"{source}: unknown key '{dotted}'{_suggest(key, fields, section + '.')}")
    f = fields[key]
    hint = typing.get_type_hints(type(sub))[key]
    setattr(sub, key, _check_value(dotted, _coerce(dotted, value, hint, source), f.metadata, source))


def _suggest(name: str, options: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, typing.get_args(hint)[0], source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{source}: '{key}' must be of type {hint.__name__}, got {value!r}")
    return value


def _check_value(key: str, value: Any, meta: typing.Mapping, source: str) -> Any:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise UserError(f"{source}: '{key}' must be one of {meta['choices']}, got {v!r}")
        if "items" in meta and v not in meta["items"]:
            raise UserError(f"{source}: '{key}' has unknown entry {v!r}; allowed: {', '.join(meta['items'])}")
        if "min" in meta and v < meta["min"]:
            raise UserError(f"{source}: '{key}' must be >= {meta['min']}, got {v!r}")
        if "max" in meta and v > meta["max"]:
            raise UserError(f"{source}: '{key}' must be <= {meta['max']}, got {v!r}")
    return value
