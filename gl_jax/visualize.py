"""Pictures of retrieval results, drawn with PIL (no plotting library needed).

* ``retrieval_grid``: one row per query: the query, then its top-k neighbours, each
  framed green (same label as the query) or red (different).
* ``tsne_map`` / ``scatter_plot``: a 2-D t-SNE map of embeddings (scikit-learn), one
  colour per class.

Layout of ``retrieval_grid`` (all sizes in pixels): every tile is ``thumb + 2 * BORDER``
square (the image inside a coloured frame); tiles in a row are ``GAP`` apart, with an extra
``SEPARATOR`` between the query and its first neighbour; rows are ``GAP`` apart; ``MARGIN``
around everything. So for ``q`` queries and ``k`` neighbours:

    width  = 2 * MARGIN + (k + 1) * tile + k * GAP + SEPARATOR
    height = 2 * MARGIN + q * tile + (q - 1) * GAP
"""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

BORDER, GAP, SEPARATOR, MARGIN = 4, 4, 12, 8
CORRECT, WRONG, QUERY = (0, 170, 0), (220, 0, 0), (40, 90, 220)
BACKGROUND = (255, 255, 255)


def grid_size(num_queries: int, k: int, thumb: int) -> tuple[int, int]:
    """(width, height) of ``retrieval_grid`` for ``num_queries`` rows of ``k`` neighbours."""
    tile = thumb + 2 * BORDER
    return (2 * MARGIN + (k + 1) * tile + k * GAP + SEPARATOR,
            2 * MARGIN + num_queries * tile + (num_queries - 1) * GAP)


def tile_origin(row: int, column: int, thumb: int) -> tuple[int, int]:
    """Top-left (x, y) of a tile's frame; column 0 is the query, 1..k the neighbours."""
    tile = thumb + 2 * BORDER
    x = MARGIN + column * (tile + GAP) + (SEPARATOR if column > 0 else 0)
    return x, MARGIN + row * (tile + GAP)


def thumbnail(image, thumb: int) -> Image.Image:
    """An RGB ``thumb`` x ``thumb`` picture of ``image`` (PIL image or uint8 [H, W] / [H, W, 3]
    array), aspect kept, centred on white. Small images are enlarged with nearest
    neighbours so that 8 px digits stay crisp."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    scale = thumb / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.BICUBIC
    image = image.resize(size, resample)
    canvas = Image.new("RGB", (thumb, thumb), BACKGROUND)
    canvas.paste(image, ((thumb - size[0]) // 2, (thumb - size[1]) // 2))
    return canvas


def retrieval_grid(query_images: Sequence, neighbour_images: Sequence[Sequence],
                   correct, *, thumb: int = 64) -> Image.Image:
    """Draws the queries and their ranked neighbours (see the module docstring's layout).

    Args:
      query_images: q images (PIL or uint8 arrays).
      neighbour_images: q sequences of k images, nearest first.
      correct: bool (q, k), whether neighbour j of query i has the query's label.
      thumb: side of each image in pixels.
    Returns:
      an RGB PIL image of size ``grid_size(q, k, thumb)``.
    """
    correct = np.asarray(correct, dtype=bool)
    q = len(query_images)
    if q < 1 or correct.ndim != 2 or correct.shape[0] != q or len(neighbour_images) != q:
        raise ValueError(f"retrieval_grid: {q} queries, {len(neighbour_images)} neighbour rows "
                         f"and correct of shape {correct.shape}; expected q >= 1 and (q, k)")
    k = correct.shape[1]
    if any(len(row) != k for row in neighbour_images):
        raise ValueError(f"retrieval_grid: every query needs {k} neighbour images, got "
                         f"{[len(row) for row in neighbour_images]}")
    if thumb < 1:
        raise ValueError(f"thumb must be >= 1 pixel, got {thumb}")
    canvas = Image.new("RGB", grid_size(q, k, thumb), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    tile = thumb + 2 * BORDER
    for i in range(q):
        row = [(query_images[i], QUERY)] + [
            (neighbour_images[i][j], CORRECT if correct[i, j] else WRONG) for j in range(k)]
        for column, (image, colour) in enumerate(row):
            x, y = tile_origin(i, column, thumb)
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=colour)
            canvas.paste(thumbnail(image, thumb), (x + BORDER, y + BORDER))
    return canvas


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, hues spread by the golden ratio (neighbouring class
    ids get distant hues), alternating two brightness levels."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    return np.asarray([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.9 - 0.3 * (i % 2))]
                       for i, h in enumerate(hues)], dtype=np.uint8).reshape(num_classes, 3)


def scatter_plot(points, labels, *, size: int = 800, radius: int = 3, margin: int = 20,
                 legend: int = 20) -> Image.Image:
    """A size x size RGB scatter plot of 2-D ``points`` (n, 2), coloured by ``labels`` (n,).

    The points are scaled uniformly (aspect kept) and centred inside the margin. With at
    most ``legend`` classes, a legend (colour swatch + label) is drawn in the top-left
    corner."""
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 1:
        raise ValueError(f"points must have shape (n, 2), n >= 1; got {points.shape}")
    if labels.shape != (points.shape[0],):
        raise ValueError(f"labels must have shape ({points.shape[0]},); got {labels.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or inf values")
    if size <= 2 * (margin + radius):
        raise ValueError(f"size {size} leaves no room inside margin {margin} and radius {radius}")
    classes, codes = np.unique(labels, return_inverse=True)
    colours = class_colours(len(classes))
    low, high = points.min(axis=0), points.max(axis=0)
    span = max(float((high - low).max()), 1e-12)
    inner = size - 2 * (margin + radius)
    # Uniform scale, then centre the shorter side's extent.
    offset = (inner - (high - low) / span * inner) / 2
    xy = margin + radius + offset + (points - low) / span * inner
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for (x, y), c in zip(xy, codes):
        y = size - y   # screen y grows downwards; flip so the map reads like a plot
        draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                     fill=tuple(int(v) for v in colours[c]))
    if len(classes) <= legend:
        for i, name in enumerate(classes):
            y = 4 + 12 * i
            draw.rectangle([4, y, 12, y + 8], fill=tuple(int(v) for v in colours[i]))
            draw.text((16, y - 2), str(name), fill=(0, 0, 0))
    return canvas


def tsne_2d(embeddings, *, seed: int = 0, perplexity: float = 30.0,
            iterations: int = 1000) -> np.ndarray:
    """t-SNE (scikit-learn, PCA initialisation) of (n, d) embeddings -> (n, 2).

    Exact gradients up to 500 points (faster there than Barnes-Hut), Barnes-Hut above.
    Perplexity is capped below n, as scikit-learn requires; iterations >= 250."""
    from sklearn.manifold import TSNE  # only the picture needs it
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"t-SNE needs embeddings of shape (n, d) with n >= 3; got {x.shape}")
    if iterations < 250:
        raise ValueError(f"t-SNE iterations must be >= 250 (scikit-learn), got {iterations}")
    perplexity = float(min(perplexity, max(1.0, (x.shape[0] - 1) / 3)))
    method = "exact" if x.shape[0] <= 500 else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method=method, max_iter=int(iterations)).fit_transform(x)


def subsample(labels, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` items, drawn uniformly without replacement
    (all of them when there are fewer)."""
    n = len(labels)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def tsne_map(embeddings, labels, *, max_points: int = 2000, size: int = 800,
             seed: int = 0, iterations: int = 1000) -> tuple[Image.Image, np.ndarray]:
    """t-SNE of at most ``max_points`` embeddings drawn as a scatter plot by class.

    Returns (picture, indices of the plotted items)."""
    keep = subsample(labels, max_points, seed)
    points = tsne_2d(np.asarray(embeddings)[keep], seed=seed, iterations=iterations)
    return scatter_plot(points, np.asarray(labels)[keep], size=size), keep
