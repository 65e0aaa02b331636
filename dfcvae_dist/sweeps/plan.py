"""A sweep file -> its tasks, each with a stable index, a name, its overrides and its run directory.

    name: paper
    base: configs/dfcvae-123.yaml       # a config path or a shipped config's name
    overrides: {data.shards: data/shards/paper-64}
    runs: {dfcvae-123: {}, pvae: {model.name: pvae, loss.beta: 1.0}}
    grid: {train.seed: [0, 1, 2]}
    evaluate: {shards: data/shards/landmarks-64}
    sweep_dir: runs/paper               # default runs/NAME

Tasks are the runs in file order crossed with the grid keys in file order, the last key fastest. Every task's
whole config is loaded (and so checked) when the sweep is loaded: a bad key or value stops everything,
naming the sweep file and the task.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfcvae_dist.config import Config, load_config, load_dataclass, opt, read_value
from dfcvae_dist.errors import UserError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Grid keys named by a short prefix (seed0); any other key by its last part and '_' (`loss.beta` -> beta_0.5).
SHORT_NAMES = {"train.seed": "seed", "model.image_size": "px", "model.latent_dim": "z"}
SET_BY_THE_SWEEP = ("train.run_dir", "log.parent_run_id", "log.run_tags")


@dataclass
class EvaluateConfig:
    """How every task is evaluated (the `evaluate:` section), read and checked as config keys are."""
    shards: str = opt("", "Manifest directory of extraction, SVMs and quality (its train, val and test splits); "
                      "required.")
    quality_shards: str | None = opt(None, "Manifest directory of the quality metrics (default: shards), e.g. the "
                                     "training crop.")
    split: str = opt("test", "The split of the quality metrics.", choices=["train", "val", "test"])
    max_images: int = opt(2000, "Images of that split in the quality metrics.", min=1, max=10**7)
    network: str = opt("vgg19", "Feature network of the quality table's perceptual distance, at its default layers "
                       "(VGG19: the paper's 123).", choices=["vgg19", "vgg16", "resnet18", "resnet50"])
    network_weights: str = opt("imagenet", "Its weights: imagenet, random or a weights file (formerly vgg_weights).")
    fid_samples: int | None = opt(10_000, "FID from this many samples (at most the split's images); null or 0: no "
                                  "FID.", min=0, max=10**7)
    fid_weights: str | None = opt(None, "Inception weights file for FID (offline machines).")
    batch_size: int = opt(256, "Extraction batch size.", min=1, max=65_536)
    svm_subsample: int = opt(20_000, "Training images used to choose each SVM's C.", min=1, max=10**7)
    svm_class_weight: str = opt("none", "none (the paper's plain SVM) or balanced.", choices=["none", "balanced"])
    svm_focus: str | None = opt(None, "Attributes also averaged on their own (dfcvae-svm --focus).")


@dataclass
class Task:
    index: int
    name: str          # run name + grid values, e.g. dfcvae-123-seed0: the run directory's and MLflow run's name
    run_name: str      # e.g. dfcvae-123: the report's column
    grid: dict[str, str]
    overrides: list[str]   # base <- these = the task's config (train.run_dir last)
    run_dir: Path
    family: str        # model.name
    config: Config = field(repr=False)


@dataclass
class Sweep:
    path: Path
    name: str
    base: str
    sweep_dir: Path
    evaluate: EvaluateConfig
    tasks: list[Task]

    def task(self, index: int) -> Task:
        if not 0 <= index < len(self.tasks):
            raise UserError(f"{self.path}: no task {index} (the sweep has tasks 0-{len(self.tasks) - 1})")
        return self.tasks[index]


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    doc, root = _read(path)
    name = _name(doc.get("name"), path, "name")
    if "base" not in doc:
        raise UserError(f"{path}: 'base' (a config file or a shipped config's name) is missing")
    sweep_dir = Path(doc.get("sweep_dir") or Path("runs") / name)
    common = _overrides(doc.get("overrides") or {}, path, "overrides")
    runs = doc.get("runs") or {}
    if not isinstance(runs, dict) or not runs:
        raise UserError(f"{path}: 'runs' must name at least one run: {{run-name: {{key: value}}}}")
    grid = _grid(doc.get("grid") or {}, path)
    _refuse_equal_grid_values(grid, _grid_lines(root), path)
    tasks = []
    for run_name, run_overrides in runs.items():
        own = _overrides(run_overrides or {}, path, f"runs.{_name(run_name, path, 'runs')}")
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values, strict=True))
            tasks.append(_task(path, doc["base"], sweep_dir, len(tasks), run_name, point,
                               common + own + [f"{k}={v}" for k, v in point.items()]))
    _refuse_duplicate_names(tasks, path)
    return Sweep(path, name, doc["base"], sweep_dir, _evaluate(doc.get("evaluate"), path), tasks)


def _read(path: Path) -> tuple[dict, yaml.Node]:
    """The sweep file, every scalar kept as the text written (BaseLoader): the config system reads values by
    each key's type, as it does for overrides on the command line; and its node tree (lines). A key written twice
    (a run, a grid key) is refused: YAML would keep the last one silently."""
    try:
        loader = yaml.BaseLoader(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read sweep file {path}: {err.strerror}") from None
    try:
        root = loader.get_single_node()
        _refuse_duplicate_keys(root, path)
        doc = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a sweep file is a mapping (name, base, overrides, runs, grid, evaluate, sweep_dir)")
    unknown = set(doc) - {"name", "base", "overrides", "runs", "grid", "evaluate", "sweep_dir"}
    if unknown:
        raise UserError(f"{path}: unknown entry '{sorted(unknown)[0]}' (a sweep file has name, base, overrides, "
                        "runs, grid, evaluate, sweep_dir)")
    return doc, root


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, where: str = "") -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, where)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value in node.value:
        key, line = f"{where}{key_node.value}", key_node.start_mark.line + 1
        if key in first_line:
            raise UserError(f"{path}, line {line}: '{key}' is written twice (first at line {first_line[key]})")
        first_line[key] = line
        _refuse_duplicate_keys(value, path, f"{key}.")


def _grid_lines(root: yaml.MappingNode) -> dict[str, list[int]]:
    """The line of every grid value, by grid key."""
    grid = next((value for key, value in root.value if key.value == "grid"), None)
    if not isinstance(grid, yaml.MappingNode):
        return {}
    return {key.value: [item.start_mark.line + 1 for item in values.value] for key, values in grid.value
            if isinstance(values, yaml.SequenceNode)}


def _refuse_equal_grid_values(grid: dict[str, list[str]], lines: dict[str, list[int]], path: Path) -> None:
    """Two values of one grid key that its type reads as one value (`train.seed: [0, 00]`) would train the same
    config twice under two names."""
    for key, texts in grid.items():
        values = []
        for text, line in zip(texts, lines[key], strict=True):
            value = read_value(key, text, f"{path}, line {line}: grid '{key}'")
            if value in values:
                first = values.index(value)
                raise UserError(f"{path}, line {line}: grid '{key}': {text!r} reads as the same value as "
                                f"{texts[first]!r} (line {lines[key][first]}): one task twice")
            values.append(value)


def _name(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise UserError(f"{path}: {where}: {value!r} is not a name of letters, digits, '.', '_' and '-'")
    return value


def _overrides(mapping: Any, path: Path, where: str) -> list[str]:
    """`{key: value}` -> ['key=value', ...], refusing the keys each task's run gets from the sweep itself."""
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: '{where}' must be a mapping of section.key: value")
    for key in mapping:
        if key in SET_BY_THE_SWEEP:
            raise UserError(f"{path}: {where}: '{key}' is set by the sweep for every task "
                            f"({', '.join(SET_BY_THE_SWEEP)})")
    return [f"{key}={_text(value, path, f'{where}.{key}')}" for key, value in mapping.items()]


def _text(value: Any, path: Path, where: str) -> str:
    """A value as an override writes it: scalars as written, lists as [a, b]."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(value) + "]"
    if not isinstance(value, str):
        raise UserError(f"{path}: {where}: a value must be a scalar or a list of scalars")
    return value


def _grid(grid: Any, path: Path) -> dict[str, list[str]]:
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(f"{path}: 'grid' must map section.key to a non-empty list of values")
    _overrides({key: values[0] for key, values in grid.items()}, path, "grid")
    return {key: [_text(v, path, f"grid.{key}") for v in values] for key, values in grid.items()}


def task_name(run_name: str, point: dict[str, str]) -> str:
    """`dfcvae-123` + {train.seed: 0, loss.beta: 0.5} -> `dfcvae-123-seed0-beta_0.5`; characters other than
    letters, digits, '.', '_' and '-' become '_' (`loss.layers=[relu1_2, relu2_1]` -> layers_relu1_2_relu2_1)."""
    parts = [run_name]
    for key, value in point.items():
        label = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{label}{'' if key in SHORT_NAMES else '_'}{re.sub(r'[^A-Za-z0-9._-]+', '_', value).strip('_')}")
    return "-".join(parts)


def _task(path: Path, base: str, sweep_dir: Path, index: int, run_name: str, point: dict, overrides: list[str]) -> Task:
    name = task_name(run_name, point)
    overrides = [*overrides, f"train.run_dir={sweep_dir / name}"]
    try:
        cfg = load_config(base, overrides)
    except UserError as err:
        raise UserError(f"{path}: task {index} {name}: {err}") from None
    return Task(index, name, run_name, point, overrides, sweep_dir / name, cfg.model.name, cfg)


def _refuse_duplicate_names(tasks: list[Task], path: Path) -> None:
    seen: dict[str, int] = {}
    for task in tasks:
        if task.name in seen:
            raise UserError(f"{path}: tasks {seen[task.name]} and {task.index} are both named {task.name} "
                            "(grid values that differ only in characters a file name cannot hold)")
        seen[task.name] = task.index


def _evaluate(section: Any, path: Path) -> EvaluateConfig:
    if not isinstance(section, dict) or not section.get("shards"):
        raise UserError(f"{path}: 'evaluate' must name at least 'shards' (the manifest directory evaluations read)")
    texts = {key: _text(value, path, f"evaluate.{key}") for key, value in section.items()}
    texts = {"network_weights" if key == "vgg_weights" else key: text for key, text in texts.items()}  # its old name
    evaluate = load_dataclass(EvaluateConfig, texts, str(path), "evaluate.")
    if evaluate.network_weights not in ("imagenet", "random") and not Path(evaluate.network_weights).is_file():
        raise UserError(f"{path}: 'evaluate.network_weights' must be imagenet, random or a weights file; "
                        f"{evaluate.network_weights!r} is none of these")
    return evaluate


def check_evaluation_data(sweep: "Sweep") -> None:
    """Before a task trains: the manifests its evaluations will read are there (planning needs no data)."""
    from dfcvae_dist.data.shards import read_manifest  # webdataset and torch: not for planning

    for key in ("shards", "quality_shards"):
        shards = getattr(sweep.evaluate, key)
        if not shards:
            continue
        try:
            read_manifest(Path(shards))
        except UserError as err:
            raise UserError(f"{sweep.path}: 'evaluate.{key}': {err} (relative paths are read from the working "
                            "directory)") from None
