"""Composed edits of the synthetic world (trainer/synthetic.py, "composed edits"): two tasks in one
instruction, exact targets, the trained / held-out combinations, and that the world's existing
tasks, sentences and examples are unchanged by them (the demo's data)."""
import hashlib
import itertools
import re

import numpy as np
import pytest

from trainer import synthetic as S

# make_examples / PHRASINGS of the existing tasks before composed edits were added (digest below)
EXISTING_DIGEST = "8bfa38ccef290570"


def _digest() -> str:
    h = hashlib.sha256()
    for split in ("train", "val", "heldout_phrasing"):  # the splits of then (dev_phrasing came later)
        for e in S.make_examples(split, 2 * len(S.TASKS), seed=5):
            h.update(np.asarray(e.source).tobytes())
            h.update(np.asarray(e.target).tobytes())
            h.update(e.instruction.encode())
            h.update(e.task.encode())
    for t in S.TASKS:
        for k in ("train", "heldout"):
            h.update("|".join(S.PHRASINGS[t][k]).encode())
    return h.hexdigest()[:16]


def test_existing_tasks_and_data_are_unchanged():
    assert _digest() == EXISTING_DIGEST
    assert not set(S.COMPOSED_TASKS) & set(S.TASKS) and set(S.PHRASINGS) == set(S.TASKS)


def test_combinations_and_the_held_out_rule():
    kinds = {t: i for i, pair in enumerate(S.CONFLICT_PAIRS) for t in pair}
    assert len(S.COMPOSED_TASKS) == len(set(S.COMPOSED_TASKS)) == 24
    assert len(S.COMPOSED_HELDOUT) == 6 and len(S.COMPOSED_TRAIN) == 18
    trained_pairs = {frozenset(S.parts(t)) for t in S.COMPOSED_TRAIN}
    trained_tasks = {p for t in S.COMPOSED_TRAIN for p in S.parts(t)}
    for t in S.COMPOSED_TASKS:
        a, b = S.parts(t)
        assert kinds[a] != kinds[b]  # never a task with its own partner or kind
    for t in S.COMPOSED_HELDOUT:
        a, b = S.parts(t)
        assert a in trained_tasks and b in trained_tasks  # each trained in other combinations...
        assert frozenset((a, b)) not in trained_pairs  # ...never together
    # every pair of kinds has combinations in both sets
    for i, j in itertools.combinations(range(4), 2):
        of = lambda ts: [t for t in ts if {kinds[p] for p in S.parts(t)} == {i, j}]  # noqa: E731
        assert len(of(S.COMPOSED_TRAIN)) == 3 and len(of(S.COMPOSED_HELDOUT)) == 1


def test_exact_targets_apply_both_edits_in_order():
    rng = np.random.default_rng(0)
    for t in S.COMPOSED_TASKS:
        a, b = S.parts(t)
        img = S.make_source(rng, 32)
        out = S.apply_task(t, img)
        assert np.array_equal(out, S.apply_task(b, S.apply_task(a, img)))
        assert not np.array_equal(out, S.apply_task(a, img)) and not np.array_equal(out, S.apply_task(b, img))
    # clipping makes additive edits order-dependent: the order is the name's
    bright = np.full((8, 8, 3), 240, np.uint8)
    assert S.apply_task("brighten+warm", bright)[0, 0, 2] == 215  # min(255, 240 + 48) - 40
    assert S.apply_task("brighten", S.apply_task("warm", bright))[0, 0, 2] == 248  # the other order: 240 - 40 + 48
    with pytest.raises(KeyError, match="unknown task"):
        S.apply_task("brighten+nope", bright)


def test_composed_examples_and_sentences():
    tasks = ["brighten", *S.COMPOSED_TRAIN[:3], S.COMPOSED_HELDOUT[0]]
    ex = S.make_examples("train", 3 * len(tasks), seed=2, tasks=tasks)
    assert [e.task for e in ex] == tasks * 3
    for e in ex:
        assert np.array_equal(np.asarray(e.target), S.apply_task(e.task, np.asarray(e.source)))
        phr = S.PHRASINGS[e.task] if e.task in S.PHRASINGS else S.COMPOSED_PHRASINGS[e.task]
        assert e.instruction in phr["train"]
    for e in S.make_examples("heldout_phrasing", 2 * len(tasks), seed=2, tasks=tasks):
        phr = S.PHRASINGS[e.task] if e.task in S.PHRASINGS else S.COMPOSED_PHRASINGS[e.task]
        assert e.instruction in phr["heldout"]
    for t in S.COMPOSED_TASKS:
        a, b = S.parts(t)
        train, held = S.COMPOSED_PHRASINGS[t]["train"], S.COMPOSED_PHRASINGS[t]["heldout"]
        assert not set(train) & set(held)
        # a sentence names both edits: one of each task's own core phrases, in the name's order
        for s in train[:: max(1, len(train) // 20)]:
            ia = min(s.find(c) for c in S._CORES[a]["train"] if c in s)
            ib = max(s.rfind(c) for c in S._CORES[b]["train"] if c in s)
            assert 0 <= ia < ib and re.search(r" and |, then ", s[ia:ib + 1])
