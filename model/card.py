"""Model card of an exported checkpoint: README.md, samples.png, training-curve.png (and, for a
class-conditional checkpoint, classes.png: samples of each class)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from model.glow import Glow

TEMPERATURES = (0.5, 0.7, 1.0)
CLASS_TEMPERATURE = 0.7
SAMPLES_PER_ROW = 10
SAMPLE_SEED = 0


def labelled_rows(rows: list[tuple[str, np.ndarray]], zoom: int = 2) -> Image.Image:
    """Rows of uint8 images (N, C, H, W), each row's text on its left."""
    c, h, w = rows[0][1].shape[1:]
    label_width, pad = 8 + 6 * max(len(text) for text, _ in rows), 2
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    grid = Image.new("RGB", (label_width + max(len(images) for _, images in rows) * cell_w, len(rows) * cell_h),
                     "white")
    draw = ImageDraw.Draw(grid)
    for row, (text, images) in enumerate(rows):
        draw.text((4, row * cell_h + cell_h // 2 - 6), text, fill="black")
        for col, image in enumerate(images):
            tile = Image.fromarray(image[0] if c == 1 else np.transpose(image, (1, 2, 0)))
            tile = tile.convert("RGB").resize((w * zoom, h * zoom), Image.NEAREST)
            grid.paste(tile, (label_width + col * cell_w, row * cell_h))
    return grid


def sample_grid(model: Glow, temperatures: tuple[float, ...] = TEMPERATURES, per_row: int = SAMPLES_PER_ROW,
                seed: int = SAMPLE_SEED) -> Image.Image:
    """One row of samples per temperature, labelled "T=..." on the left (a conditional model: the mixture)."""
    return labelled_rows([(f"T={t}", model.sample(per_row, t, seed=seed).cpu().numpy()) for t in temperatures])


def class_grid(model: Glow, temperature: float = CLASS_TEMPERATURE, per_row: int = SAMPLES_PER_ROW,
               seed: int = SAMPLE_SEED) -> Image.Image:
    """One row of samples per class of a class-conditional model, labelled with the class's name."""
    return labelled_rows([(name, model.sample(per_row, temperature, seed=seed, label=k).cpu().numpy())
                          for k, name in enumerate(model.config.labels)])


def training_curve(log_path: Path, out: Path) -> bool:
    """Plot train/validation bits/dim against hours from a run's log.jsonl; False if there is no log."""
    if not log_path.is_file():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["wall_time_s"] / 3600, r["train_bpd"]) for r in records if "train_bpd" in r]
    val = [(r["wall_time_s"] / 3600, r["val_bpd"]) for r in records if "val_bpd" in r]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train (running mean, dequantised)")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation (EMA weights, dequantised)")
    values = [v for _, v in train + val]
    if values:
        ax.set_ylim(min(values) - 0.05, min(max(values), min(values) + 1.5))
    ax.set_xlabel("training hours")
    ax.set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def class_lines(cfg: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """A class-conditional checkpoint's lines under the bits/dim table: p(x | label) and the accuracy."""
    if not cfg.get("labels"):
        return []
    lines = ["", f"Class-conditional: a Gaussian per class on the top latent ({len(cfg['labels'])} classes: "
             f"{', '.join(cfg['labels'])}); the rows above are of p(x), the mixture over the classes with their "
             "training frequencies, which is what the service scores."]
    if metrics.get("test_bits_per_dim_given_label") is not None:
        lines += [f"Of p(x | label) with each test image's own label: {metrics['test_bits_per_dim_given_label']:.4f} "
                  f"bits/dim dequantised, {metrics['test_bits_per_dim_given_label_bin_centre']:.4f} at bin centres. "
                  f"Test accuracy of argmax_k p(k | x) (a sanity check, not a goal): {metrics['test_accuracy']:.4f}."]
    return lines


def init_lines(training: dict[str, Any]) -> list[str]:
    """Where a run fine-tuned from another checkpoint started, and what that one cost."""
    start = training.get("init_from")
    if not start:
        return []
    cost = (f": {start['steps']:,} steps, {start['wall_time_s'] / 3600:.2f} h on {start['hardware']}"
            if start.get("steps") is not None and start.get("wall_time_s") is not None else "")
    return [f"- started from the checkpoint `{start['name']}` (weights sha256 `{str(start['weights_sha256'])[:12]}...`)"
            f"{cost}; the steps and hours above are this run's only"]


def write_card(model: Glow, meta: dict[str, Any], directory: Path, log_path: Path) -> None:
    """Write samples.png, training-curve.png (when the run has a log) and README.md into ``directory``."""
    sample_grid(model).save(directory / "samples.png")
    if model.conditional:
        class_grid(model).save(directory / "classes.png")
    has_curve = training_curve(log_path, directory / "training-curve.png")
    cfg, metrics, training, dataset = meta["config"], meta["metrics"], meta["training"], meta["dataset"]
    files = {**dataset["train_files"], **dataset["test_files"]}
    lines = [
        f"# {meta['name']}",
        "",
        f"Glow (Kingma & Dhariwal, 2018) trained on {dataset['name']}: {cfg['levels']} levels x "
        f"{cfg['steps_per_level']} steps (ActNorm, LU 1x1 conv, affine coupling of width "
        f"{cfg['hidden_channels']}), learned split and top priors, {cfg['n_bits']}-bit "
        f"{'x'.join(map(str, cfg['image_shape']))} images, {meta['parameters']:,} parameters.",
        "",
        "| split | bits/dim (dequantised, seed " + str(metrics["dequantization_seed"]) + ") | bits/dim (bin centre, as served) |",
        "|---|---|---|",
        f"| train (first {metrics['train_images_scored']:,}) | {metrics['train_bits_per_dim']:.4f} | {metrics['train_bits_per_dim_bin_centre']:.4f} |",
        f"| validation ({dataset['validation']}) | {metrics['val_bits_per_dim']:.4f} | {metrics['val_bits_per_dim_bin_centre']:.4f} |",
        f"| test | {metrics['test_bits_per_dim']:.4f} | {metrics['test_bits_per_dim_bin_centre']:.4f} |",
        *class_lines(cfg, metrics),
        "",
        "## Data",
        "",
        *[f"- `{name}`: sha256 `{sha}`" for name, sha in files.items()],
        "",
        "## Training",
        "",
        f"- command: `{training['command']}`",
        *[f"- resumed with: `{resume}`" for resume in training.get("resumed_with", [])],
        f"- {training['steps']:,} steps ({training['epochs']} epochs), {training['wall_time_s'] / 3600:.2f} h "
        f"on {training['hardware']}",
        f"- settings: `{json.dumps(training['settings'], sort_keys=True)}`; evaluated and exported weights: "
        f"{training['weights']}",
        *init_lines(training),
        f"- weights sha256: `{meta['weights_sha256']}`",
        "",
    ]
    if has_curve:
        lines += ["![training curve](training-curve.png)", ""]
    lines += [f"Samples at temperatures {', '.join(map(str, TEMPERATURES))} (seed {SAMPLE_SEED}):", "",
              "![samples](samples.png)", ""]
    if model.conditional:
        lines += [f"Samples of each class at temperature {CLASS_TEMPERATURE} (seed {SAMPLE_SEED}):", "",
                  "![samples of each class](classes.png)", ""]
    notes = directory / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    (directory / "README.md").write_text("\n".join(lines))
