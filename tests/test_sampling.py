"""Sample grids: one row per prompt, labelled with it."""

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from adrpo_diffusion.trainer import Trainer
from adrpo_diffusion.utils import image_grid


def solid(values):
    """Images (N, 3, 32, 32), image i all ``values[i]``."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).clone()


def test_grid_labels_each_row_in_a_band_on_the_left():
    plain = image_grid(solid([0.0] * 6), cols=3, min_cell=32)
    assert plain.size == (96, 64)
    labelled = np.asarray(image_grid(solid([0.0] * 6), cols=3, labels=["a red apple", "x" * 200], min_cell=32).convert("L"))
    band = labelled.shape[1] - 96
    assert labelled.shape[0] == 64 and 40 < band < 400  # the long label is shortened
    for row in range(2):
        text = labelled[row * 32 : (row + 1) * 32, :band]
        assert (text < 128).any() and (text > 128).any()  # dark letters on white
    assert (labelled[:, band:] == 0).all()  # the images are untouched


def test_grid_enlarges_small_images_and_labels_each_column_on_top():
    images = solid([0.2, 0.8])
    images[0, :, 0, 0] = 1.0  # one white pixel in the first image's corner
    grid = np.asarray(image_grid(images, cols=2, column_labels=["seed 7", "seed 8"]).convert("L"), dtype=float) / 255
    top = grid.shape[0] - 96  # 32 px enlarged 3x to reach 96
    assert grid.shape[1] == 2 * 96 and 8 < top < 40
    for col in range(2):
        header = grid[:top, col * 96 : (col + 1) * 96]
        assert (header < 0.5).any() and (header > 0.5).any()  # dark letters on white
    cells = grid[top:]
    assert np.allclose(cells[:3, :3], 1.0, atol=0.01) and np.allclose(cells[3, 3], 0.2, atol=0.01)  # 1 px -> 3x3
    assert np.allclose(cells[48, [48, 144]], [0.2, 0.8], atol=0.01)


def test_trainer_samples_have_one_labelled_row_per_prompt(tmp_path):
    # held-out images come seed-major: (seed 0: prompts 0, 1, 2), (seed 1: prompts 0, 1, 2)
    trainer = SimpleNamespace(output_dir=tmp_path, prompts=["p0", "skipped", "p1", "p2"], eval_indices=[0, 2, 3],
                              cfg=SimpleNamespace(eval_seeds=[1000, 1001]))
    Trainer.save_samples(trainer, solid([0.1, 0.2, 0.3, 0.6, 0.7, 0.8]), "final")
    grid = np.asarray(Image.open(tmp_path / "samples" / "final.png").convert("L"), dtype=float)
    top = grid.shape[0] - 3 * 96  # the seeds' band
    assert 8 < top < 40
    cells = grid[top + 48::96, -144::96] / 255  # the centre of each cell of the two image columns
    assert np.allclose(cells, [[0.1, 0.6], [0.2, 0.7], [0.3, 0.8]], atol=0.01)
