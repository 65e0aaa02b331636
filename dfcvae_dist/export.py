"""A trained model as one shareable, self-describing folder: the layout `huggingface_hub.upload_folder` pushes.

    OUT/model.safetensors   the checkpoint's consolidated weights, as training wrote them (the model config in
                            their metadata too)
    OUT/config.json         {"library", "family", "model": the model's config, "training": the other config
                            sections, "step", "checkpoint"}
    OUT/README.md           the model card: warnings, the model, how to use it, the data's lineage, the recipe,
                            the evaluation numbers the run has, intended use and limits

`dfcvae_dist.inference.load_trained(OUT)` loads it, and `load_trained("hf://OWNER/NAME")` once it is pushed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from dfcvae_dist.config import Config, load_config
from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.families import get_family
from dfcvae_dist.inference import (HUB_SCHEME, MODEL_FOLDER_CARD, MODEL_FOLDER_CONFIG, MODEL_FOLDER_WEIGHTS,
                                   hub_endpoint, load_model_folder, resolve_checkpoint)
from dfcvae_dist.metrics import LATENT, QUALITY, SVM, formatted
from dfcvae_dist.rundir import (CHECKPOINTS, CONFIG_FILE, DONE_MARKER, RESUME_MARKER, WEIGHTS_FILE, atomic_path,
                                atomic_write)
from dfcvae_dist.training.state import TrainerState

SVM_REPORT = Path("eval/svm/svm_report.json")
QUALITY_REPORT = Path("eval/quality/quality.json")
RECIPE_KEYS = ("optim.lr", "optim.beta1", "optim.beta2", "optim.lr_decay_per_epoch", "optim.grad_clip",
               "train.batch_size", "train.grad_accum", "train.epochs", "train.max_steps", "train.seed",
               "train.sync_bn", "loss.alpha", "loss.beta", "loss.network", "loss.layers", "loss.network_weights",
               "loss.feature_scale", "loss.adversarial_weight")


def export_model(run_dir: str | Path, out: Path, which: str = "latest", repo: str | None = None) -> Path:
    """Write the model folder of `run_dir`'s checkpoint `which` (latest or best; a checkpoint folder: that one) into
    `out`; the checkpoint it came from. `repo` (OWNER/NAME) only names the model in the card's example."""
    checkpoint = resolve_checkpoint(run_dir, which)
    which = which if checkpoint != Path(run_dir) else "the folder given"
    cfg = load_config(checkpoint / CONFIG_FILE)
    state = TrainerState.read(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FOLDER_WEIGHTS) as tmp:
        shutil.copyfile(checkpoint / WEIGHTS_FILE, tmp)
    training = {section: values for section, values in cfg.to_dict().items() if section != "model"}
    atomic_write(out / MODEL_FOLDER_CONFIG, json.dumps(
        {"library": "dfcvae_dist", "family": cfg.model.name, "model": asdict(cfg.model), "training": training,
         "step": state.step, "checkpoint": f"{checkpoint.name} ({which})"}, indent=1))
    model, _, _ = load_model_folder(out, expect=None)  # the folder loads, or the export fails here
    card = model_card(cfg, state, checkpoint, which, run_directory(checkpoint), model, repo)
    atomic_write(out / MODEL_FOLDER_CARD, card)
    return checkpoint


def run_directory(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint folder belongs to (RUN/checkpoints/step-N), else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def push_folder(folder: Path, repo: str) -> str:
    """Upload the model folder to the Hub model repository `repo` (OWNER/NAME; created if missing) with
    huggingface_hub, which takes its token from $HF_TOKEN or `hf auth login`; the repository's URL."""
    from huggingface_hub import HfApi

    check_repo(repo)
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          allow_patterns=[MODEL_FOLDER_WEIGHTS, MODEL_FOLDER_CONFIG, MODEL_FOLDER_CARD],
                          commit_message="dfcvae-export")
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises its own, httpx's and OSError
        raise UserError(f"--push {repo}: could not upload to the Hugging Face Hub at {endpoint} "
                        f"({type(err).__name__}: {one_line(err, 300)}); {folder} is complete: push it again "
                        "later") from None
    return f"{endpoint.rstrip('/')}/{repo}"


def check_repo(repo: str) -> None:
    owner, _, name = repo.partition("/")
    if not owner or not name or "/" in name:
        raise UserError(f"--push {repo}: expected OWNER/NAME, e.g. my-lab/dfcvae-123")


# The model card

def model_card(cfg: Config, state: TrainerState, checkpoint: Path, which: str, run_dir: Path | None, model,
               repo: str | None) -> str:
    family = get_family(cfg.model.name)
    manifest = readable_manifest(cfg.data.shards)
    name = cfg.log.run_name or (run_dir.name if run_dir else checkpoint.name)
    lines = [*front_matter(family, manifest), f"# {name}: {family.title}", "",
             *warnings(cfg, state, manifest, run_dir),
             *model_section(cfg, state, checkpoint, which, model),
             *usage_section(family, repo),
             *data_section(cfg, manifest),
             *recipe_section(cfg, state),
             *evaluation_section(run_dir, checkpoint),
             *limits_section(family, cfg, manifest)]
    return "\n".join(lines) + "\n"


def readable_manifest(shards: str) -> dict | None:
    """The training shards' manifest, or None where it is not readable here (a URL pattern, another machine's
    path, a damaged file): the card then says the lineage is unknown."""
    from dfcvae_dist.data.shards import manifest_of

    try:
        return manifest_of(shards)
    except UserError:
        return None


def front_matter(family, manifest: dict | None) -> list[str]:
    """The Hub's metadata block."""
    tags = ["dfcvae_dist", family.name, "vae" if family.encodes else "gan", "faces"]
    if manifest and manifest.get("synthetic"):
        tags.append("synthetic-data")
    return ["---", "library_name: dfcvae_dist", "pipeline_tag: unconditional-image-generation",
            "tags:", *(f"- {tag}" for tag in tags), "---", ""]


def warnings(cfg: Config, state: TrainerState, manifest: dict | None, run_dir: Path | None) -> list[str]:
    lines = []
    if state.feature_weights.startswith("random"):
        lines.append(f"> **Warning: trained with RANDOM {cfg.loss.network} loss-network weights "
                     f"(`{state.feature_weights}`).** Its loss is not the paper's feature perceptual loss: this model "
                     "demonstrates the pipeline, not the method.")
    if manifest is None:
        lines.append(f"> **Warning: the training data's lineage is unknown here**: no shard manifest readable at "
                     f"`{cfg.data.shards}` when this folder was exported.")
    elif manifest.get("synthetic"):
        lines.append("> **Warning: trained on synthetic faces** drawn by `dfcvae-synthetic`, not on CelebA: it has "
                     "seen those drawings only, and its numbers say nothing about real faces.")
    if run_dir is not None and (run_dir / RESUME_MARKER).is_file():
        lines.append(f"> **Warning: training stopped before its end** (`{RESUME_MARKER}` in the run directory), at "
                     f"step {state.step}.")
    return [line for warning in lines for line in (warning, "")]


def model_section(cfg: Config, state: TrainerState, checkpoint: Path, which: str, model) -> list[str]:
    m, family = cfg.model, get_family(cfg.model.name)
    parameters = sum(p.numel() for p in model.parameters())
    what = ("encodes RGB images in [0, 1], (N, 3, H, W), to the mean and log-variance of a latent z, and decodes "
            "z to images" if family.encodes else "generates images in [0, 1] from z ~ N(0, I); it has no encoder")
    return ["## Model", "",
            f"- **{family.title}** (`model.name: {m.name}`), {m.image_size}×{m.image_size} images, latent size "
            f"{m.latent_dim}, base channels {m.base_channels}; {parameters:,} parameters in the part that "
            f"{'encodes and decodes' if family.encodes else 'generates'}.",
            f"- It {what}.",
            f"- Checkpoint `{checkpoint.name}` ({which}): {state.step:,} optimizer steps, {state.epoch} whole "
            f"epoch(s), trained by `dfcvae_dist` on {state.world_size} process(es).", ""]


def usage_section(family, repo: str | None) -> list[str]:
    where = f"{HUB_SCHEME}{repo}" if repo else f"{HUB_SCHEME}OWNER/NAME"
    if not family.encodes:
        return ["## Use", "", "```python", "from dfcvae_dist.inference import load_trained, sample",
                f'model, cfg, folder = load_trained("{where}", expect=None)  # or the path of this folder',
                "randoms = sample(model, 16, seed=0)", "```", ""]
    return ["## Use", "", "```python", "from dfcvae_dist.inference import load_trained, encode, decode, sample",
            f'model, cfg, folder = load_trained("{where}")  # or the path of this folder',
            "mu, logvar = encode(model, images)  # images in [0, 1], (N, 3, H, W)", "faces = decode(model, mu)",
            "randoms = sample(model, 16, seed=0)", "```", ""]


def data_section(cfg: Config, manifest: dict | None) -> list[str]:
    from dfcvae_dist.training.run_page import data_line

    if manifest is None:
        return ["## Data", "", f"`{cfg.data.shards}`: no shard manifest readable here (a WebDataset URL pattern, or "
                "shards not on this machine), so no counts, digest or source.", ""]
    crop = manifest.get("crop")
    return ["## Data", "", data_line(cfg.data.shards, manifest),
            *([""] if crop is None else ["", f"Crop `{crop}`, {manifest.get('image_size')} px."]), ""]


def recipe_section(cfg: Config, state: TrainerState) -> list[str]:
    from dfcvae_dist.training.run_page import family_params

    family = get_family(cfg.model.name)
    params = family_params(cfg)
    rows = [f"| `{key}` | `{params[key]}` |" for key in RECIPE_KEYS if key in params]
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * state.world_size
    return ["## Training recipe", "", *[line for loss_line in family.loss_lines(cfg, state.feature_weights)
                                        for line in (loss_line, "")],
            f"Global batch {global_batch} ({state.world_size} process(es) × {cfg.train.batch_size} × "
            f"{cfg.train.grad_accum} accumulated), precision `{state.precision or cfg.train.mixed_precision}`.", "",
            "| key | value |", "| --- | --- |", *rows, "",
            "<details><summary>The whole resolved config</summary>", "", "```yaml", cfg.to_yaml().rstrip(), "```", "",
            "</details>", ""]


def evaluation_section(run_dir: Path | None, checkpoint: Path) -> list[str]:
    """The numbers the run's evaluations left in RUN_DIR/eval/, for this checkpoint only."""
    lines = ["## Evaluation", ""]
    if run_dir is None:
        return lines + ["Exported from a checkpoint folder outside a run directory: no evaluation numbers.", ""]
    rows, notes = [], []
    svm = read_report(run_dir / SVM_REPORT, notes)
    if svm is not None and same_checkpoint(svm.get("checkpoint"), checkpoint, SVM_REPORT, notes):
        rows += [metric_row(m, svm.get(m.key)) for m in SVM if svm.get(m.key) is not None]
        rows += [metric_row(m, (svm.get("latent") or {}).get(m.key)) for m in LATENT
                 if (svm.get("latent") or {}).get(m.key) is not None]
    quality = read_report(run_dir / QUALITY_REPORT, notes)
    entry = next(iter((quality or {}).get("models", {}).values()), None)
    if entry is not None and same_checkpoint(entry.get("checkpoint"), checkpoint, QUALITY_REPORT, notes):
        rows += [metric_row(m, entry.get(m.key)) for m in QUALITY]
        notes += [f"`{key}`: {note}" for key, note in quality.get("notes", {}).items()]
    if not rows:
        return lines + ["No evaluation of this checkpoint in the run directory (`dfcvae-svm`, `dfcvae-quality` "
                        "write eval/svm and eval/quality).", *(f"- {note}" for note in notes), ""]
    return lines + ["What the run's evaluations measured on this checkpoint (names: docs/metrics.md).", "",
                    "| metric | value | unit |", "| --- | --- | --- |", *rows, "", *(f"- {note}" for note in notes), ""]


def read_report(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path}: unreadable, left out ({one_line(err)})")
        return None


def same_checkpoint(evaluated: str | None, checkpoint: Path, report: Path, notes: list[str]) -> bool:
    if evaluated and Path(evaluated).resolve() == checkpoint.resolve():
        return True
    notes.append(f"`{report}` evaluated `{evaluated or 'an unrecorded checkpoint'}`, not this one: left out")
    return False


def metric_row(metric, value) -> str:
    return f"| `{metric.name}` ({metric.label}) | {formatted(metric, value)} | {metric.unit} |"


def limits_section(family, cfg: Config, manifest: dict | None) -> list[str]:
    size = cfg.model.image_size
    lines = ["## Intended use and limits", ""]
    if family.encodes:
        lines += ["- Intended for research and teaching on variational autoencoders of faces: encoding, "
                  "reconstructing, sampling, interpolating and attribute arithmetic in the latent space "
                  "(`dfcvae_dist.inference`).",
                  f"- Inputs must look like its training data: {size}×{size} face crops made as the shards' crop "
                  "makes them, RGB in [0, 1]. Other images are encoded, but to latents that mean little."]
    else:
        lines.append("- Intended for research and teaching on generative models of faces: sampling.")
    lines += [f"- Its images are {size}×{size}, low-resolution and not realistic portraits.",
              "- Not for identifying, verifying or profiling people, nor for any decision about a person; the "
              "attribute labels it may be probed with (CelebA's 40) are subjective annotations."]
    if manifest is not None and manifest.get("synthetic"):
        lines.append("- Trained on synthetic drawings: it has never seen a photograph.")
    else:
        lines.append("- It inherits the skews of its training faces (CelebA: celebrities, skewed in age, skin tone "
                     "and gender presentation); CelebA's agreement allows non-commercial research use only.")
    return lines + [""]
