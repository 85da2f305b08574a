"""The synthetic edit world (trainer/synthetic.py): exact targets, disjoint splits, determinism."""

import hashlib
import time

import numpy as np
import pytest
from PIL import Image

from trainer import synthetic as S
from trainer.synthetic import (CONFLICT_PAIRS, PHRASINGS, TASKS, EditExample, apply_task,
                               make_examples)


def _arr(img):
    return np.asarray(img, dtype=np.uint8)


def _digest(img):
    return hashlib.sha1(_arr(img).tobytes()).hexdigest()


def test_api_shape():
    assert isinstance(TASKS, tuple) and len(TASKS) == len(set(TASKS)) >= 12
    for a, b in CONFLICT_PAIRS:
        assert a in TASKS and b in TASKS and a != b
        assert S.CONFLICT_PARTNER[a] == b and S.CONFLICT_PARTNER[b] == a
    assert set(PHRASINGS) == set(TASKS)
    assert set(S.NON_CONFLICTING) <= set(TASKS)
    ex = make_examples("train", 3)
    assert all(isinstance(e, EditExample) for e in ex)
    e = ex[0]
    assert e.source.mode == "RGB" and e.target.mode == "RGB"
    assert e.source.size == e.target.size == (64, 64)
    assert e.task in TASKS and isinstance(e.instruction, str)
    assert make_examples("val", 1, resolution=32)[0].source.size == (32, 32)


@pytest.mark.parametrize("split", S.SPLITS)
def test_targets_exact_and_recomputable(split):
    for e in make_examples(split, 3 * len(TASKS), seed=3):
        again = apply_task(e.task, e.source)
        assert isinstance(again, Image.Image)
        assert np.array_equal(_arr(again), _arr(e.target)), e.task
        # numpy in, numpy out, same numbers
        assert np.array_equal(apply_task(e.task, _arr(e.source)), _arr(e.target))


def test_every_task_changes_the_image():
    ex = make_examples("train", 4 * len(TASKS), seed=1)
    for task in TASKS:
        changed = [not np.array_equal(_arr(e.source), _arr(e.target)) for e in ex if e.task == task]
        assert all(changed), task


def test_tasks_balanced_and_labelled():
    ex = make_examples("train", 5 * len(TASKS))
    counts = {t: sum(e.task == t for e in ex) for t in TASKS}
    assert set(counts.values()) == {5}
    for e in ex:
        assert e.instruction in PHRASINGS[e.task]["train"]
    sub = make_examples("train", 10, tasks=("brighten", "darken"))
    assert [e.task for e in sub] == ["brighten", "darken"] * 5


def test_determinism_and_slicing():
    a = make_examples("train", 20, seed=7)
    b = make_examples("train", 20, seed=7)
    c = make_examples("train", 10, seed=7, start=10)
    for x, y in zip(a, b):
        assert _digest(x.source) == _digest(y.source) and _digest(x.target) == _digest(y.target)
        assert x.instruction == y.instruction and x.task == y.task
    for x, y in zip(a[10:], c):
        assert _digest(x.source) == _digest(y.source) and x.instruction == y.instruction
    d = make_examples("train", 20, seed=8)
    assert sum(_digest(x.source) == _digest(y.source) for x, y in zip(a, d)) == 0


def test_splits_disjoint():
    train = make_examples("train", 600)
    val = make_examples("val", 200)
    held = make_examples("heldout_phrasing", 200)
    train_imgs = {_digest(e.source) for e in train}
    assert len(train_imgs) == len(train)               # no duplicate images within train
    assert not train_imgs & {_digest(e.source) for e in val}
    assert not train_imgs & {_digest(e.source) for e in held}
    # phrasings: train/val share wordings, held-out wordings are never seen in training
    for task in TASKS:
        tr, ho = PHRASINGS[task]["train"], PHRASINGS[task]["heldout"]
        assert len(tr) >= 3 and len(ho) >= 2 and not set(tr) & set(ho)
    all_train_phrases = {p for t in TASKS for p in PHRASINGS[t]["train"]}
    assert all(e.instruction in all_train_phrases for e in train + val)
    assert not {e.instruction for e in held} & all_train_phrases
    for e in held:
        assert e.instruction in PHRASINGS[e.task]["heldout"]
    # heldout_phrasing = val's images and tasks, only the wording differs
    for v, h in zip(val, held):
        assert _digest(v.source) == _digest(h.source) and v.task == h.task
    with pytest.raises(ValueError):
        make_examples("test", 1)


def test_instructions_are_short():
    for task in TASKS:
        for kind in ("train", "heldout"):
            for p in PHRASINGS[task][kind]:
                assert 0 < len(p.split()) <= 12, p


def test_conflicting_pairs_invert():
    ex = make_examples("val", 30, seed=11)
    k = 64 // 8
    for e in ex:
        a = _arr(e.source)
        # rotations: exact inverses everywhere
        assert np.array_equal(apply_task("rotate_ccw", apply_task("rotate_cw", a)), a)
        assert np.array_equal(apply_task("rotate_cw", apply_task("rotate_ccw", a)), a)
        # shifts: exact inverses on the interior (the border is edge-filled)
        lr = apply_task("shift_right", apply_task("shift_left", a))
        assert np.array_equal(lr[:, k:64 - k], a[:, k:64 - k])
        rl = apply_task("shift_left", apply_task("shift_right", a))
        assert np.array_equal(rl[:, k:64 - k], a[:, k:64 - k])
        # recolour: red->blue then blue->red restores every red pixel (and everything else
        # that was not blue to begin with)
        blue_before = S._blue_mask(a)
        back = apply_task("blue_to_red", apply_task("red_to_blue", a))
        assert np.array_equal(back[~blue_before], a[~blue_before])
        red_before = S._red_mask(a)
        back = apply_task("red_to_blue", apply_task("blue_to_red", a))
        assert np.array_equal(back[~red_before], a[~red_before])
        # brightness: exact inverse where nothing clipped
        ok = (a >= S.BRIGHTNESS_DELTA) & (a <= 255 - S.BRIGHTNESS_DELTA)
        assert np.array_equal(apply_task("darken", apply_task("brighten", a))[ok], a[ok])
        # opposite directions for the non-invertible pairs
        f = a.astype(float)
        assert _arr(apply_task("brighten", a)).mean() > f.mean() > _arr(apply_task("darken", a)).mean()
        hf = lambda x: np.abs(np.diff(np.asarray(x, float), axis=1)).mean()  # edge energy
        assert hf(apply_task("sharpen", a)) > hf(a) > hf(apply_task("blur", a))
        # grow then shrink approximately restores the centre
        gs = apply_task("shrink", apply_task("grow", a)).astype(float)
        assert np.abs(gs[16:48, 16:48] - f[16:48, 16:48]).mean() < 12
        # the flip is its own inverse
        assert np.array_equal(apply_task("flip_horizontal", apply_task("flip_horizontal", a)), a)


def test_grayscale_is_gray():
    a = apply_task("grayscale", _arr(make_examples("train", 1)[0].source))
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])


def test_fast():
    t = time.perf_counter()
    make_examples("train", 500)
    assert time.perf_counter() - t < 5.0


def test_unknown_task():
    with pytest.raises(KeyError):
        apply_task("teleport", make_examples("train", 1)[0].source)
