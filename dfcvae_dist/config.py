"""Typed run configuration: dataclasses <- YAML file (a path, or a shipped config by name) <- `section.key=value`
overrides.

Every option has a type, a default, a help text and whether a resumed run may change it (the field metadata).
Loading checks unknown and duplicated keys, types, choices and ranges and names the offending key and its
source (file and line, or the override). Values are read by the field's type, not by YAML 1.1's guesses: a
str field keeps its text as written (`2024-05-01`, `0123`), an int field reads decimal digits, a float field
must be finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from dfcvae_dist.errors import UserError

# The shipped configs: a link to the top-level configs/ in a checkout, package data in an installed wheel.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
NULL_TAG = "tag:yaml.org,2002:null"


class Renamed(typing.NamedTuple):
    """A key renamed together with its values: `values` maps each old value (read by the old key's type, the type
    of its keys) to the new key's."""

    key: str
    values: dict


# Keys that were renamed: config files, overrides and run directories written with the old name keep loading.
RENAMED_KEYS = {"loss.vgg_weights": "loss.network_weights", "loss.vgg_dtype": "loss.network_dtype",
                "loss.vgg_seed": "loss.network_seed",
                "loss.compile": Renamed("train.compile", {True: "loss", False: "off"})}


# Upper bounds of the keys without a natural one: a value past them would fail at run time (numpy takes seeds below
# 2**32; a wait longer than a few years overflows), ask for absurd memory, or mean a typo.
SEED_MAX = 2**32 - 1
STEPS_MAX = 10**9
WEIGHT_MAX = 1e6
FP32_MAX = 3.4028234663852886e38  # a scale the loss's fp32 arithmetic can hold; past ~1e19 a loss overflows
DAY_S, WEEK_S = 86_400, 7 * 86_400


def opt(default: Any, help: str, *, resume_safe: bool = False, **checks: Any) -> Any:
    """A config field: default, help text, whether a resumed run may change it (it changes neither the model,
    the optimisation nor the data order and position) and optional checks (choices=, min=, max=, items=,
    nonempty=, key_value=, words=; choices and items may be functions, for lists known only at run time; words:
    plain words a field of type `T | str` takes besides a T, such as `auto`)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "resume_safe": resume_safe, **checks}, **kw)


@dataclass
class DataConfig:
    shards: str = opt("data/shards/paper-64", "Manifest directory written by tools/make_shards.py, or a "
                      "WebDataset URL pattern (braces, pipe:, http) for the training split.")
    val_shards: str | None = opt(None, "URL pattern of the validation split when `shards` is a pattern.",
                                 resume_safe=True)
    num_workers: int | str = opt("auto", "DataLoader worker processes per rank, or auto: this process's share of "
                                 "the CPUs it may use (its CPU affinity / the local processes, one left for the "
                                 "process itself), at most 8 and at most what the shards allow (ranks x workers <= "
                                 "shards). Each worker reads its own shards, so the count decides the sample order: "
                                 "checkpoints record it and a resume with auto keeps it.", min=0, max=64,
                                 words=["auto"])
    shuffle_buffer: int = opt(1000, "Samples in each worker's shuffle buffer.", min=0, max=100_000)
    num_samples: int | None = opt(None, "Training samples per epoch when `shards` is a pattern (a manifest "
                                  "knows its own).", min=1, max=10**9)
    cache: str = opt("none", "Training split held in memory: none (streamed from the shards), memory (this rank's "
                     "shards read once into one uint8 tensor in host memory, pinned on CUDA) or device (on the "
                     "training device); batches are gathered by index from a seeded per-epoch shuffle of the rank's "
                     "samples (another order than streaming's). A cache that does not fit is refused with the "
                     "estimate and the free memory (docs/data.md).", choices=["none", "memory", "device"])
    skip_corrupt: bool = opt(False, "Skip damaged samples (an undecodable or missing image, invalid JSON) in "
                             "training and validation, each named in a warning and counted in MLflow "
                             "(train/skipped_samples), instead of stopping.")


@dataclass
class ModelConfig:
    name: str = opt("dfcvae", "Model family: dfcvae (feature perceptual loss), pvae (pixel loss), dcgan, dfcvae-gan "
                    "(feature perceptual loss plus a discriminator), or one a package registers (entry point group "
                    "dfcvae_dist.families; docs/extending.md).", choices=lambda: family_names())
    image_size: int = opt(64, "Square input/output size: 64 is the paper's, 128 the released code's variant, "
                          "32 a small size for tests and demos.", choices=[32, 64, 128])
    latent_dim: int = opt(100, "Size of z.", min=1, max=4096)
    base_channels: int = opt(32, "Channels of the first encoder block, doubled per block (paper: 32); "
                             "DCGAN: the discriminator's first block (Radford et al.: 64).", min=1, max=256)
    init: str = opt("normal", "Weight init: normal (N(0, 0.02) convolutions, as the released code) or "
                    "default (PyTorch's).", choices=["normal", "default"])


@dataclass
class LossConfig:
    network: str = opt("vgg19", "Feature network of the perceptual loss: vgg19 (the paper's), vgg16, resnet18, "
                       "resnet50, or package.module:function returning a torch.nn.Module (docs/extending.md).")
    layers: list[str] | None = opt(None, "Layers of the feature network the loss compares, as torchvision's "
                                   "feature_extraction names them; VGG also by the paper's names: relu1_2, relu2_1, "
                                   "relu3_1 is the paper's '123', relu3_1, relu4_1, relu5_1 its '345'. null: the "
                                   "network's default (VGG: '123'; ResNet: relu, layer1, layer2).", nonempty=True)
    layer_weights: list[float] | None = opt(None, "Optional weight per layer (default 1 each).", min=0.0,
                                            max=WEIGHT_MAX)
    alpha: float = opt(1.0, "Weight of the KL divergence (paper: 1).", min=0.0, max=WEIGHT_MAX)
    beta: float = opt(0.8, "Weight of the reconstruction loss (paper: 0.8).", min=0.0, max=WEIGHT_MAX)
    feature_scale: float = opt(57.6, "Multiplier on VGG features before the distance. 57.6 = 255 x mean "
                               "ImageNet std maps torchvision's normalised input to the Caffe BGR 0-255 "
                               "scale the paper's alpha/beta were tuned on (docs/paper-fidelity.md).",
                               min=0.0, max=FP32_MAX)
    network_weights: str = opt("imagenet", "imagenet (torchvision weights API), random (seeded; tests and offline "
                               "demos) or a path to a local state-dict file of the network (formerly "
                               "loss.vgg_weights).")
    network_dtype: str = opt("auto", "Feature-network dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16 "
                             "(formerly loss.vgg_dtype).", choices=["auto", "fp32", "fp16", "bf16"])
    network_seed: int = opt(0, "Seed of the random network weights (network_weights=random; formerly "
                            "loss.vgg_seed).", min=0, max=SEED_MAX)
    adversarial_weight: float = opt(1.0, "dfcvae-gan: weight of the adversarial term (the decoder's non-saturating "
                                    "GAN loss on reconstructions and samples) beside alpha x KL + beta x perceptual.",
                                    min=0.0, max=WEIGHT_MAX)


@dataclass
class OptimConfig:
    lr: float = opt(5e-4, "Adam learning rate (paper: 5e-4; DCGAN: 2e-4).", min=0.0, max=1.0)
    beta1: float = opt(0.9, "Adam beta1 (DCGAN: 0.5).", min=0.0, max=1.0)
    beta2: float = opt(0.999, "Adam beta2.", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "Adam weight decay.", min=0.0, max=1.0)
    lr_decay_per_epoch: float = opt(0.5, "Multiply lr by this after every epoch (paper: 0.5).",
                                    min=0.0, max=1.0)
    grad_clip: float | None = opt(None, "Clip the global gradient norm to this value.", min=0.0, max=WEIGHT_MAX)


@dataclass
class TrainConfig:
    run_dir: str = opt("runs/default", "Directory for checkpoints, the resolved config and markers.",
                       resume_safe=True)
    epochs: int = opt(5, "Epochs over the training split (paper: 5).", min=1, max=100_000,
                       resume_safe=True)
    max_steps: int | None = opt(None, "Optimizer steps in total; overrides epochs when set.", min=1, max=STEPS_MAX,
                                resume_safe=True)
    batch_size: int = opt(64, "Per-rank micro-batch size.", min=1, max=4096)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", min=1, max=1024)
    seed: int = opt(0, "Seed of model init, data order and sampling.", min=0, max=SEED_MAX)
    resume: str = opt("auto", "auto (newest complete checkpoint, if any), none, or a checkpoint path.",
                      resume_safe=True)
    # items: a function, because the keys are known only once Config is defined
    resume_allow_changes: list[str] = opt([], "Keys a resumed run may change although they are not "
                                          "resume-safe, e.g. [optim.lr]: you take responsibility for the "
                                          "change.", items=lambda: config_keys(), resume_safe=True)
    mixed_precision: str = opt("auto", "Autocast of the trained model: auto takes the launcher's "
                               "(accelerate launch --mixed_precision, or its config file); an explicit value wins "
                               "over a launcher's 'no' and must agree with any other; under DeepSpeed its config "
                               "decides.", choices=["auto", "no", "fp16", "bf16"])
    channels_last: bool = opt(True, "Channels-last memory format for the model, loss network and batches "
                               "(bench: +32% training img/s on a 2-core CPU).")
    sync_every_steps: int = opt(25, "Ranks agree on a stop request and on non-finite losses every N steps (and "
                                "before every checkpoint): the only collective of a step that neither logs nor "
                                "saves. A stop takes at most N steps.", min=1, max=1_000_000,
                                resume_safe=True)
    sync_bn: bool = opt(False, "SyncBatchNorm under multi-GPU DDP: batch norm over the global batch, as the "
                        "paper's 64 images, whatever the per-GPU batch (CUDA only).")
    deterministic: bool = opt(False, "Deterministic kernels on CUDA (torch.use_deterministic_algorithms, cuDNN "
                              "deterministic, no TF32): bit-exact resume on GPU, at some speed (docs/reliability.md).")
    val_every_steps: int = opt(0, "Validation loss on the val split every N steps (0: off).", min=0, max=STEPS_MAX,
                               resume_safe=True)
    val_batches: int = opt(4, "Batches per rank in one validation pass.", min=1, max=1_000_000,
                              resume_safe=True)
    threads: int | None = opt(None, "Torch threads per process (default: cores / local processes).", min=1, max=1024,
                              resume_safe=True)
    on_nonfinite: str = opt("stop", "NaN/Inf loss: stop (error naming step and rank) or skip the step.",
                            choices=["stop", "skip"], resume_safe=True)
    compile: str = opt("off", "torch.compile: off; loss (the loss network and its distances: fuses the elementwise "
                       "work around the convolutions); step (forward, loss, backward and the optimizer step, with "
                       "CUDA graphs on one GPU; formerly loss.compile). Compiling takes seconds to a minute at start "
                       "and needs a C++ compiler on CPU, Triton on GPU (docs/performance.md).",
                       choices=["off", "loss", "step"], resume_safe=True)
    collective_timeout_s: int = opt(300, "Timeout of collectives; a dead rank ends the job after it.", min=1,
                                    max=WEEK_S,
                                    resume_safe=True)
    early_stop_patience: int | None = opt(None, "Stop after N validations in a row without a better "
                                          "checkpoint.keep_best metric (the run is complete: COMPLETED.json says "
                                          "why; null: never stop early).", min=1, max=1_000_000,
                                          resume_safe=True)
    lock_stale_s: float = opt(120.0, "Seconds without a heartbeat in RUN_DIR/.lock after which a launch on another "
                              "host takes the run directory over (its owner's node died or hangs; written into the "
                              "lock, which the owner refreshes every twelfth of it). An owner alive on the same host "
                              "is never taken over.", min=1.0, max=WEEK_S, resume_safe=True)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(500, "Save a checkpoint every N optimizer steps (0: only at end and on stop).",
                           min=0, max=STEPS_MAX, resume_safe=True)
    keep: int = opt(3, "Keep the newest K checkpoints (and the best one, with keep_best).", min=1, max=10_000,
                    resume_safe=True)
    keep_best: str | None = opt(None, "A validation metric (val/total): also save the checkpoint of every validated "
                                "step that betters it, point checkpoints/best at the best, and never prune it. "
                                "Lower is better unless the metric's declaration says otherwise.", resume_safe=True)


@dataclass
class LogConfig:
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                   "MLflow's own sqlite:///mlflow.db).", resume_safe=True)
    experiment: str = opt("dfcvae", "MLflow experiment name.", resume_safe=True)
    run_name: str | None = opt(None, "MLflow run name (default: the run directory's name).", resume_safe=True)
    every_steps: int = opt(10, "Log metrics every N optimizer steps.", min=1, max=STEPS_MAX,
                           resume_safe=True)
    image_every_steps: int = opt(200, "Log image grids every N steps (0: only at the end).", min=0, max=STEPS_MAX,
                                 resume_safe=True)
    on_unavailable: str = opt("error", "Tracking server unreachable at start: error, or warn and train "
                              "untracked.", choices=["error", "warn"], resume_safe=True)
    enabled: bool = opt(True, "Track at all (false: none of log.trackers).", resume_safe=True)
    trackers: list[str] = opt(["mlflow"], "Where the run logs: mlflow, and tensorboard (event files in "
                              "RUN_DIR/tensorboard/, the same scalar and image names as in MLflow).",
                              choices=["mlflow", "tensorboard"], nonempty=True, resume_safe=True)
    system_metrics: bool = opt(True, "MLflow's system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py): "
                               "one monitor per node with an http(s) tracking URI, the main process only with "
                               "sqlite or a file store.", resume_safe=True)
    system_metrics_interval_s: float = opt(10.0, "Seconds between system-metric samples.", min=0.1, max=DAY_S,
                                           resume_safe=True)
    flush_timeout_s: float = opt(30.0, "At the end of a run, wait at most this long for MLflow to take what is "
                                 "still queued (a hung server costs a finished run this much, never more).",
                                 min=0.0, max=DAY_S, resume_safe=True)
    progress_every_s: float = opt(30.0, "In a job log (stderr not a terminal): a plain progress line at the first "
                                  "log step after every N seconds (0: at every log step).", min=0.0, max=DAY_S,
                                  resume_safe=True)
    parent_run_id: str | None = opt(None, "MLflow run to nest this run under (mlflow.parentRunId); a sweep sets "
                                    "its parent run here.", resume_safe=True)
    run_tags: list[str] = opt([], "Extra MLflow tags of the run, as KEY=VALUE (a sweep sets its name and the "
                              "task's index and name).", key_value=True, resume_safe=True)
    model: str = opt("final", "Log the trained model to MLflow as a LoggedModel of the run (safetensors + "
                     "our code, loadable with mlflow.pyfunc.load_model): the final one, every checkpoint, or none.",
                     choices=["final", "checkpoints", "none"], resume_safe=True)

    def uses(self, tracker: str) -> bool:
        """The run logs to `tracker` (mlflow, tensorboard)."""
        return self.enabled and tracker in self.trackers


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


def shipped_configs() -> list[str]:
    """Names of the configs that ship with the package (`quickstart`, `dfcvae-123`, ...)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """The config file to read: the path itself when it is a file or has a folder part, else the shipped
    config of that name (with or without `.yaml`); a folder named like one (`make quickstart` writes
    `quickstart/`) does not hide it."""
    path = Path(name_or_path)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = SHIPPED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped.resolve()
    names = shipped_configs()
    raise UserError(f"config '{name_or_path}' is neither a file nor a shipped config{_suggest(path.stem, names)}; "
                    f"shipped: {', '.join(names)}")


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (a path or a shipped config's name) <- `section.key=value` overrides, each
    checked against the dataclasses."""
    cfg = Config()
    if path is not None:
        path = resolve_config(path)
        for dotted, node, line in _file_entries(path):
            _set(cfg, dotted, node, f"{path}, line {line}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"command-line override '{item}' is not of the form section.key=value")
        _set(cfg, key.strip(), text, f"command-line override '{item}'")
    source = f"{path}" if path is not None else "the configuration"
    return finalize(cfg, f"{source} with its command-line overrides" if overrides else source)


def config_from_dict(sections: typing.Mapping, source: str) -> Config:
    """A config from its `to_dict()` form (a model folder's config.json), every key checked as a file's are."""
    cfg = Config()
    for section, values in sections.items():
        if not isinstance(values, typing.Mapping):
            raise UserError(f"{source}: '{section}' is not a section of keys")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", yaml.compose(json.dumps(value), Loader=yaml.SafeLoader), source)
    return finalize(cfg, source)


def finalize(cfg: Config, source: str) -> Config:
    """The checks that need more than one key, asked of the model family (which also fills in what it defaults,
    such as the feature network's layers); a refusal names `source` and the keys."""
    from dfcvae_dist.families import get_family

    try:
        family = get_family(cfg.model.name)
        family.check_config(cfg)
        check_keep_best(cfg, family)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    return cfg


def read_value(dotted: str, text: str, source: str) -> Any:
    """One key's value from its text, read and checked as a command-line override's is (`train.seed`, `00` -> 0)."""
    cfg = Config()
    _set(cfg, dotted, text, source)
    renamed = RENAMED_KEYS.get(dotted, dotted)
    section, _, key = (renamed if isinstance(renamed, str) else renamed.key).partition(".")
    return getattr(getattr(cfg, section), key)


def check_keep_best(cfg: Config, family) -> None:
    """checkpoint.keep_best names a validation metric of the family, the run validates, and early stopping has a
    metric to watch."""
    from dfcvae_dist.metrics import validation_metrics

    best, patience = cfg.checkpoint.keep_best, cfg.train.early_stop_patience
    if patience is not None and best is None:
        raise UserError(f"train.early_stop_patience={patience} watches the metric of checkpoint.keep_best: set it too, "
                        "e.g. checkpoint.keep_best=val/total")
    if best is None:
        return
    names = [m.name for m in validation_metrics(family.metrics(cfg))]
    if best not in names:
        allowed = f"one of {', '.join(names)}" if names else f"model.name={family.name} computes none"
        raise UserError(f"checkpoint.keep_best: {best!r} is not a validation metric ({allowed})"
                        f"{_suggest(best, names)}")
    if not cfg.train.val_every_steps:
        raise UserError(f"checkpoint.keep_best={best} needs validations: set train.val_every_steps")


DataclassT = typing.TypeVar("DataclassT")


def load_dataclass(cls: type[DataclassT], texts: typing.Mapping[str, str], source: str, prefix: str = "") -> DataclassT:
    """Another dataclass of `opt()` fields (e.g. a sweep file's `evaluate:`) from {field: text}, read by each
    field's type and checked as config keys are: errors name `source` and the key as `PREFIX` + field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, text in texts.items():
        key = prefix + name
        if name not in fields:
            raise UserError(f"{source}: unknown key '{key}'{_suggest(name, fields, prefix)}")
        values[name] = _field_value(key, text, hints[name], fields[name].metadata, source)
    return cls(**values)


def _read_yaml(path: Path) -> yaml.Node | None:
    """The file's YAML node tree, after constructing all of it with the safe loader (which refuses tags that
    would build objects); the nodes keep each value's source text and line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            loader.construct_document(root)
        return root
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from None
    finally:
        loader.dispose()


def _file_entries(path: Path) -> Iterator[tuple[str, yaml.Node, int]]:
    """(section.key, value node, line) of every entry of a config file."""
    root = _read_yaml(path)
    if root is None:
        return
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}: top level must be a mapping of sections, got a {root.id}")
    for section, values, line in _mapping_entries(root, path, ""):
        _check_section(section, f"{path}, line {line}")
        if not isinstance(values, yaml.MappingNode):
            raise UserError(f"{path}, line {line}: section '{section}' must be a mapping")
        for key, value, key_line in _mapping_entries(values, path, f"{section}."):
            yield f"{section}.{key}", value, key_line


def _mapping_entries(node: yaml.MappingNode, path: Path, prefix: str) -> Iterator[tuple[str, yaml.Node, int]]:
    """(key, value node, line) of a YAML mapping; a key written twice is refused (YAML keeps the last)."""
    first_line: dict[str, int] = {}
    for key_node, value in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in first_line:
            raise UserError(f"{path}, line {line}: duplicate key '{prefix}{key}' (first at line {first_line[key]})")
        first_line[key] = line
        yield key, value, line


def _check_section(section: str, source: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if section not in fields:
        raise UserError(f"{source}: unknown section '{section}'{_suggest(section, fields)}")
    return fields[section]


def _set(cfg: Config, dotted: str, value: yaml.Node | str, source: str) -> None:
    """Set one key from a file's YAML node or an override's text."""
    dotted, value = _renamed(dotted, value, source)
    section, _, key = dotted.partition(".")
    _check_section(section, source)
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise UserError(f"{source}: unknown key '{dotted}'{_suggest(key, fields, section + '.')}")
    hint = typing.get_type_hints(type(sub))[key]
    setattr(sub, key, _field_value(dotted, value, hint, fields[key].metadata, source))


def _field_value(key: str, value: yaml.Node | str, hint: Any, meta: typing.Mapping, source: str) -> Any:
    """A field's value, typed and checked; a field with `words` also takes one of them, quoted or not (JSON quotes)."""
    words = meta.get("words", [])
    if words:
        plain = value if isinstance(value, str) else value.value if isinstance(value, yaml.ScalarNode) else None
        if plain in words:
            return plain
        hint = next(a for a in typing.get_args(hint) if a is not str)
    return _check_value(key, _typed(key, value, hint, source, words), meta, source)


def _renamed(dotted: str, value: yaml.Node | str, source: str) -> tuple[str, yaml.Node | str]:
    """The key's current name, and its value in the current key's terms."""
    renamed = RENAMED_KEYS.get(dotted, dotted)
    if isinstance(renamed, str):
        return renamed, value
    old = _typed(dotted, value, type(next(iter(renamed.values))), source)
    return renamed.key, renamed.values[old]


def _suggest(name: str, options: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _typed(key: str, value: yaml.Node | str, hint: Any, source: str, words: typing.Sequence[str] = ()) -> Any:
    """The field's value from a YAML node, or from an override's text: a str field takes that text as it
    is, `null` clears an optional field, anything else is read as YAML (`[a, b]` is a list)."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if isinstance(value, str):
        if hint is str and not (optional and value == "null"):
            return value
        value = _override_node(value)
    if optional and value.tag == NULL_TAG:
        return None
    if typing.get_origin(hint) is list:
        if not isinstance(value, yaml.SequenceNode):
            raise UserError(f"{source}: '{key}' must be a list, got {_shown(value)}")
        return [_typed(f"{key}[{i}]", item, typing.get_args(hint)[0], source) for i, item in enumerate(value.value)]
    typed = _scalar(value, hint) if isinstance(value, yaml.ScalarNode) else None
    if typed is None:
        raise UserError(f"{source}: '{key}' must be {''.join(w + ' or ' for w in words)}of type {hint.__name__}, "
                        f"got {_shown(value)}")
    return typed


def _override_node(text: str) -> yaml.Node:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        node = None
    return node if node is not None else yaml.ScalarNode("tag:yaml.org,2002:str", text)


def _scalar(node: yaml.ScalarNode, hint: type) -> Any:
    """A scalar as a str, int, float or bool by its text (None if it is not one): decimal ints, not YAML
    1.1's octal `0123` or sexagesimal `1:30`; a quoted number is text."""
    if hint is str:
        return node.value
    if node.style is not None:
        return None
    if hint is bool:
        return yaml.constructor.SafeConstructor.bool_values.get(node.value.lower())
    try:
        return hint(node.value)
    except ValueError:
        return None


def _shown(node: yaml.Node) -> str:
    return repr(node.value) if isinstance(node, yaml.ScalarNode) else f"a {node.id}"


def _check_value(key: str, value: Any, meta: typing.Mapping, source: str) -> Any:
    if meta.get("nonempty") and value == []:
        raise UserError(f"{source}: '{key}' needs at least one entry")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{source}: '{key}' must be a finite number, got {v!r}")
        if "choices" in meta and v not in _choices(meta):
            raise UserError(f"{source}: '{key}' must be one of {_choices(meta)}, got {v!r}"
                            f"{_suggest(str(v), map(str, _choices(meta)))}")
        if "items" in meta and v not in _items(meta):
            raise UserError(f"{source}: '{key}' has unknown entry {v!r}{_suggest(v, _items(meta))}; "
                            f"allowed: {', '.join(_items(meta))}")
        if meta.get("key_value") and not str(v).partition("=")[0]:
            raise UserError(f"{source}: '{key}' entries are KEY=VALUE, got {v!r}")
        if ("min" in meta and v < meta["min"]) or ("max" in meta and v > meta["max"]):
            raise UserError(f"{source}: '{key}' must be {_range(meta)}, got {v!r}")
    return value


def _range(meta: typing.Mapping) -> str:
    if "min" in meta and "max" in meta:
        return f"between {meta['min']} and {meta['max']}"
    return f">= {meta['min']}" if "min" in meta else f"<= {meta['max']}"


def _items(meta: typing.Mapping) -> list[str]:
    items = meta["items"]
    return items() if callable(items) else items


def _choices(meta: typing.Mapping) -> list:
    choices = meta["choices"]
    return choices() if callable(choices) else choices


def family_names() -> list[str]:
    from dfcvae_dist.families import family_names as registered

    return registered()


def config_keys() -> list[str]:
    """Every `section.key`, in declaration order."""
    return [key for key, _, _ in _key_fields()]


def _key_fields() -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(section.key, type hint, field) of every config key, in declaration order."""
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{section.name}.{f.name}", hints[f.name], f


def resume_changes(saved: Config, now: Config) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """The keys whose value differs between a checkpoint's config and this run's, as (safe, refused) lists of
    (key, old, new). Safe: declared `resume_safe`, or named in this run's `train.resume_allow_changes`."""
    allowed = set(now.train.resume_allow_changes)
    allowed |= {key for key, _, f in _key_fields() if f.metadata["resume_safe"]}
    old, new = saved.flat(), now.flat()
    changed = [(key, old[key], new[key]) for key in new
               if old[key] != new[key] and not _resolved_by_trainer(key, old[key], new[key])]
    return [c for c in changed if c[0] in allowed], [c for c in changed if c[0] not in allowed]


def _resolved_by_trainer(key: str, old: Any, new: Any) -> bool:
    """Values the trainer resolves and compares itself. `train.mixed_precision=auto` takes the launcher's precision,
    so it accepts any saved value: the trainer compares the precision it resolved with the one the checkpoint was
    trained in (run directories written before this rule kept the resolved value in their config).
    `data.num_workers=auto` on either side: the trainer compares the worker count the checkpoint recorded with this
    launch's (auto keeps the recorded one)."""
    if key == "train.mixed_precision":
        return new == "auto"
    return key == "data.num_workers" and "auto" in (old, new)


def _show(value: Any) -> str:
    """A value as it is written in a config file or an override."""
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(hint: Any, meta: typing.Mapping) -> str:
    if meta.get("words"):
        return " or ".join([next(a for a in typing.get_args(hint) if a is not str).__name__, *meta["words"]])
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _allowed(meta: typing.Mapping) -> str:
    """The field's checks in words: `one of a, b`, `>= 1`, `0.0 to 1.0`, ..."""
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(map(_show, _choices(meta))))
    if "min" in meta and "max" in meta:
        parts.append(f"{meta['min']} to {meta['max']}")
    elif "min" in meta or "max" in meta:
        parts.append(f">= {meta['min']}" if "min" in meta else f"<= {meta['max']}")
    if "items" in meta:
        items = meta["items"]
        parts.append("config keys" if callable(items) else f"entries {items[0]} ... {items[-1]}")
    if meta.get("nonempty"):
        parts.append("at least one")
    return "; ".join(parts)


def config_help() -> str:
    """Every config key with its type, default, allowed values, resume safety and help: the text below
    `dfcvae-train --help`."""
    lines = ["config keys (set in the --config file or as section.key=value; a resume-safe key may change",
             "when a run resumes; docs/configuration.md has the same list):"]
    for key, hint, f in _key_fields():
        facts = [_type_name(hint, f.metadata), f"default {_show(_default(f))}", _allowed(f.metadata)]
        facts.append("resume-safe" if f.metadata["resume_safe"] else "")
        lines.append(f"  {key} ({', '.join(p for p in facts if p)})")
        lines.append(textwrap.fill(f.metadata["help"], 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


CONFIGURATION_DOC_INTRO = """\
# Configuration

<!-- Generated by `python tools/generate_docs.py` from the dataclasses in dfcvae_dist/config.py; do not edit.
     tests/test_config.py checks that this file is what the generator writes. -->

A run's configuration is typed dataclasses (`dfcvae_dist/config.py`) <- one YAML file <- `section.key=value`
overrides on the command line, later ones winning:

```bash
dfcvae-train --config dfcvae-123 train.batch_size=32 'loss.layers=[relu3_1, relu4_1, relu5_1]'
```

- `--config` takes a path, or the name of a shipped config (a file of `configs/`, also inside the
  installed package): {shipped}.
- Values are read by the key's type, not by YAML's guesses: a `str` key keeps its text as written
  (`log.run_name=2024-05-01`, `0123`), an `int` key takes decimal digits, a `float` key must be finite
  (`nan`, `inf` are refused), a list is written `[a, b]`, and `null` clears a key whose type allows `None`.
- An unknown section or key (with the closest name suggested), a key written twice in one file, a wrong
  type, a value out of its range (every number has one, so a value cannot fail later at run time: seeds
  within numpy's 0 to 2**32 - 1, sizes and timeouts within what a run can use) or not among the choices, and
  YAML tags that would construct objects (files are read with the safe loader) each stop with one line naming
  the key and the file and line, or the override.
- The resolved config is saved as `RUN_DIR/config.yaml` and in every checkpoint, logged to MLflow as
  parameters and as an artifact.
- **Resume-safe** keys may differ when a run resumes from a checkpoint: they change neither the model, the
  optimisation nor the data order and position. Any other change is refused on resume, unless the key is
  listed in `train.resume_allow_changes` (you take responsibility for it, e.g.
  `train.resume_allow_changes=[optim.lr]`). `data.num_workers`, `data.shuffle_buffer` and `data.cache` are
  not resume-safe: each worker reads its own shards and shuffles its own buffer, and a cache shuffles the
  rank's samples as a whole, so they change the sample order. Checkpoints record the worker count a run
  resolved, and a resume with `data.num_workers=auto` keeps it.
"""


def config_markdown() -> str:
    """docs/configuration.md: the intro above, then one table per section."""
    out = [CONFIGURATION_DOC_INTRO.format(shipped=", ".join(f"`{name}`" for name in shipped_configs())).rstrip()]
    section = None
    for key, hint, f in _key_fields():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            out += ["", f"## {section}", "", "| key | type | default | allowed | resume-safe | help |",
                    "| --- | --- | --- | --- | --- | --- |"]
        cells = [f"`{key}`", _type_name(hint, f.metadata), f"`{_show(_default(f))}`", _allowed(f.metadata),
                 "yes" if f.metadata["resume_safe"] else "no", f.metadata["help"]]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"
