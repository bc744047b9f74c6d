"""toy.py, the demo's world: the rule scorer (area) and the fidelity measure on images with known answers."""
import math

import numpy as np
import torch

import toy


def _batch(*imgs):
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]


def test_area_matches_geometry_and_bigger_shape_wins():
    S = toy.SIZE
    for colour in toy.COLOURS:
        for shape, true_area in (("circle", lambda r: math.pi * r * r), ("square", lambda r: 4 * r * r)):
            small = toy.render(colour, shape, 2.5, S / 2, S / 2)
            big = toy.render(colour, shape, 5.5, S / 2, S / 2)
            a = toy.area(_batch(small, big), [f"a {colour} {shape}"] * 2)
            assert a[1] > a[0]
            for got, r in zip(a.tolist(), (2.5, 5.5)):  # the foreground fraction is the shape's true area
                assert abs(got * S * S - true_area(r)) <= 2 * math.pi * r * 0.6, (colour, shape, r, got * S * S)
    white = np.ones((S, S, 3), np.float32)
    assert toy.area(_batch(white)).item() == 0.0


def test_fidelity_and_colour_detection():
    rng = np.random.default_rng(0)
    prompts = [p for p in toy.PROMPTS for _ in range(5)]
    imgs = _batch(*[toy.random_image(p, rng) for p in prompts])
    assert toy.dominant_colour(imgs) == [p.split()[1] for p in prompts]
    assert toy.fidelity(imgs, prompts).tolist() == [1.0] * len(prompts)
    shift = {"red": "blue", "green": "red", "blue": "green"}  # every prompt names another colour
    wrong = [" ".join(shift.get(w, w) for w in p.split()) for p in prompts]
    assert toy.fidelity(imgs, wrong).tolist() == [0.0] * len(prompts)
    white = np.ones((toy.SIZE, toy.SIZE, 3), np.float32)
    assert toy.fidelity(_batch(white), ["a red circle"]).tolist() == [0.0]  # no shape: not faithful
    assert toy.dominant_colour(_batch(white)) == [None]
