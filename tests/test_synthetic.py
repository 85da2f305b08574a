"""The synthetic edit world (trainer/synthetic.py): exact targets, disjoint splits, determinism, a
vocabulary that makes held-out sentences answerable, conflicting pairs that really pull apart."""

import hashlib
import re
import time

import numpy as np
import pytest
from PIL import Image

from trainer import synthetic as S
from trainer.synthetic import (ADAPTER_TASKS, BASE_TASKS, CONFLICT_PAIRS, PHRASINGS, TASKS, EditExample, apply_task,
                               make_examples)


def _arr(img):
    return np.asarray(img, dtype=np.uint8)


def _digest(img):
    return hashlib.sha1(_arr(img).tobytes()).hexdigest()


def test_api_shape():
    assert isinstance(TASKS, tuple) and len(TASKS) == len(set(TASKS)) >= 12
    assert set(ADAPTER_TASKS) | set(BASE_TASKS) == set(TASKS)
    assert len(CONFLICT_PAIRS) >= 3
    for a, b in CONFLICT_PAIRS:
        assert a in ADAPTER_TASKS and b in ADAPTER_TASKS and a != b
        assert a not in BASE_TASKS and b not in BASE_TASKS  # the base model never learns the conflicts
        assert S.CONFLICT_PARTNER[a] == b and S.CONFLICT_PARTNER[b] == a
    assert set(PHRASINGS) == set(TASKS)
    assert set(S.NON_CONFLICTING) <= set(ADAPTER_TASKS)
    ex = make_examples("train", 3)
    assert all(isinstance(e, EditExample) for e in ex)
    e = ex[0]
    assert e.source.mode == "RGB" and e.target.mode == "RGB"
    assert e.source.size == e.target.size == (32, 32)
    assert e.task in TASKS and isinstance(e.instruction, str)
    assert make_examples("val", 1, resolution=64)[0].source.size == (64, 64)


@pytest.mark.parametrize("split", S.SPLITS)
def test_targets_exact_and_recomputable(split):
    for e in make_examples(split, 3 * len(TASKS), seed=3):
        again = apply_task(e.task, e.source)
        assert isinstance(again, Image.Image)
        assert np.array_equal(_arr(again), _arr(e.target)), e.task
        assert np.array_equal(apply_task(e.task, _arr(e.source)), _arr(e.target))  # numpy in, numpy out


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
    for task in TASKS:
        tr, ho = PHRASINGS[task]["train"], PHRASINGS[task]["heldout"]
        assert len(tr) >= 12 and len(ho) >= 4 and not set(tr) & set(ho)
    all_train_phrases = {p for t in TASKS for p in PHRASINGS[t]["train"]}
    assert all(e.instruction in all_train_phrases for e in train + val)
    assert not {e.instruction for e in held} & all_train_phrases
    for e in held:
        assert e.instruction in PHRASINGS[e.task]["heldout"]
    for v, h in zip(val, held):  # heldout_phrasing = val's images and tasks, only the wording differs
        assert _digest(v.source) == _digest(h.source) and v.task == h.task
    with pytest.raises(ValueError):
        make_examples("test", 1)


def _words(sentence):
    return set(re.findall(r"[a-z]+", sentence.lower()))


def test_heldout_sentences_are_answerable_from_the_training_vocabulary():
    """A held-out sentence is a new sentence, but a text encoder can only know words it saw: each
    one contains a word that training sentences use for its own task only, and none that they use
    for one other task only."""
    seen = {t: set().union(*map(_words, PHRASINGS[t]["train"])) for t in TASKS}
    own = {t: seen[t] - set().union(*(seen[u] for u in TASKS if u != t)) for t in TASKS}
    for t in TASKS:
        for s in PHRASINGS[t]["heldout"]:
            w = _words(s)
            assert w & own[t], (t, s)
            assert not any(w & own[u] for u in TASKS if u != t), (t, s)
            assert len(s.split()) <= 12


def _cores_and_frames(kind):
    return ({c for t in TASKS for c in S._CORES[t][kind]}, set(S._FRAMES[kind]))


def test_dev_sentences_choose_settings_without_touching_the_heldout_wording():
    """The dev split ("dev_phrasing") is held-out style wording for choosing settings: new cores in
    new frames, each sentence answerable from its own task's words like a held-out one, and no
    sentence, core or frame shared with the held-out or training sentences."""
    seen = {t: set().union(*map(_words, PHRASINGS[t]["train"])) for t in TASKS}
    own = {t: seen[t] - set().union(*(seen[u] for u in TASKS if u != t)) for t in TASKS}
    task_words = {t: set().union(*map(_words, PHRASINGS[t]["train"] + PHRASINGS[t]["heldout"])) for t in TASKS}
    world_words = set().union(*task_words.values())
    dev_cores, dev_frames = _cores_and_frames("dev")
    for kind in ("train", "heldout"):
        cores, frames = _cores_and_frames(kind)
        assert not dev_cores & cores and not dev_frames & frames, kind
    others = {p for t in TASKS for k in ("train", "heldout") for p in PHRASINGS[t][k]}
    for t in TASKS:
        assert len(S._CORES[t]["dev"]) == 3 and len(S._FRAMES["dev"]) == 2
        dev = PHRASINGS[t]["dev"]
        assert len(dev) == len(set(dev)) == 6 and not set(dev) & others, t
        for c in S._CORES[t]["dev"]:
            assert _words(c) <= task_words[t], (t, c)  # words the world already uses for this task
        for s in dev:
            w = _words(s)
            assert w & own[t], (t, s)
            assert not any(w & own[u] for u in TASKS if u != t), (t, s)
            assert w <= world_words, (t, s)  # nothing the text encoder never saw
    # dev_phrasing = val's images and tasks with dev sentences; val and heldout_phrasing unchanged by it
    val, held, dev = (make_examples(s, 3 * len(TASKS), seed=4) for s in ("val", "heldout_phrasing", "dev_phrasing"))
    for v, h, d in zip(val, held, dev):
        assert _digest(v.source) == _digest(d.source) and _digest(v.target) == _digest(d.target) and v.task == d.task
        assert d.instruction in PHRASINGS[d.task]["dev"] and h.instruction in PHRASINGS[h.task]["heldout"]
    assert len({e.instruction for e in dev}) > len(TASKS)  # the sentences vary within a task
    with pytest.raises(ValueError, match="no 'dev' sentences"):
        make_examples("dev_phrasing", 2, tasks=S.COMPOSED_TRAIN[:1])


def test_images_are_smooth_and_colourful():
    """Large soft structures the 8x-downsampled latent grid can carry: 8x8 average pooling and
    bilinear upsampling alone keep most of the image."""
    a = np.stack([_arr(e.source) for e in make_examples("val", 64)]).astype(np.float64)
    n, h, w, _ = a.shape
    pooled = a.reshape(n, h // 8, 8, w // 8, 8, 3).mean((2, 4))
    up = np.asarray([np.asarray(Image.fromarray(p.astype(np.uint8)).resize((w, h), Image.BILINEAR)) for p in pooled],
                    dtype=np.float64)
    psnr = 10 * np.log10(255 ** 2 / ((up - a) ** 2).reshape(n, -1).mean(1))
    assert psnr.mean() > 24
    spread = a.max(axis=3) - a.min(axis=3)  # colour saturation per pixel
    assert spread.mean() > 30


def test_conflicting_pairs_pull_apart():
    """Each pair undoes the other (exactly where nothing clipped), so one shared update must
    compromise: the two targets of one source are far apart."""
    ex = make_examples("val", 30, seed=11)
    k = 8
    gaps = {pair: [] for pair in CONFLICT_PAIRS}
    for e in ex:
        a = _arr(e.source)
        f = a.astype(float)
        ok = (a >= S.BRIGHTNESS_DELTA) & (a <= 255 - S.BRIGHTNESS_DELTA)
        assert np.array_equal(apply_task("darken", apply_task("brighten", a))[ok], a[ok])
        assert _arr(apply_task("brighten", a)).mean() > f.mean() > _arr(apply_task("darken", a)).mean()
        warm, cool = apply_task("warm", a).astype(float), apply_task("cool", a).astype(float)
        assert (warm[..., 0] - warm[..., 2]).mean() > (f[..., 0] - f[..., 2]).mean() > (cool[..., 0] - cool[..., 2]).mean()
        lr = apply_task("shift_right", apply_task("shift_left", a))
        assert np.array_equal(lr[:, k:32 - k], a[:, k:32 - k])  # exact on the interior
        assert np.array_equal(apply_task("hue_backward", apply_task("hue_forward", a)), a)
        assert np.array_equal(apply_task("hue_forward", apply_task("hue_backward", a)), a)
        for x, y in CONFLICT_PAIRS:
            gaps[(x, y)].append(np.abs(apply_task(x, a).astype(float) - apply_task(y, a).astype(float)).mean())
    for pair, d in gaps.items():  # mean |difference| of the two targets, in 0..255 units
        assert min(d) > 2 and np.mean(d) > 10, (pair, np.mean(d))


def test_base_tasks():
    a = _arr(make_examples("train", 1)[0].source)
    g = apply_task("grayscale", a)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert np.array_equal(apply_task("invert", apply_task("invert", a)), a)
    assert np.array_equal(apply_task("swap_red_blue", a)[..., ::-1], a)
    assert np.array_equal(apply_task("shift_down", a)[8:], a[:-8])


def test_fast():
    t = time.perf_counter()
    make_examples("train", 500)
    assert time.perf_counter() - t < 5.0


def test_unknown_task():
    with pytest.raises(KeyError):
        apply_task("teleport", make_examples("train", 1)[0].source)
