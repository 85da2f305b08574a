"""Chained edits (trainer/edits.py): rows whose `edits` column lists the instruction's parts train
the generator with the sum of one LoRA per edit, as two HY-WU edits chained in ComfyUI compute it
(tests/test_runtime_lora.py::test_two_edits_chained_add_up shows the graph sums them).

Tiny seeded bases and real diffusers models; the generator's forward is watched to see which
conditions the trainer really feeds it."""
from __future__ import annotations

import json

import pytest
import torch

from hywu_nodes.core import GeneratedLoRA, HYWUGenerator
from trainer import synthetic
from trainer.data import BadRow, build_datasets, parse_edits
from trainer.config import ConfigError, validate
from trainer.edits import Chaining, EditPlan
from trainer.tiny_bases import tiny_config
from trainer.train import run

COMBO = "brighten+shift_left"


def test_synthetic_combinations_carry_their_edits_and_singles_do_not():
    ex = synthetic.make_examples("train", 4, tasks=["brighten", COMBO])
    assert ex[0].edits == ()
    a, b = ex[1].edits
    assert a in synthetic.PHRASINGS["brighten"]["train"] and b in synthetic.PHRASINGS["shift_left"]["train"]
    # the edits have their own random stream: everything else is as before they existed
    again = synthetic.make_examples("train", 4, tasks=["brighten", COMBO])
    assert [e.instruction for e in ex] == [e.instruction for e in again] and ex[1].edits == again[1].edits
    assert synthetic.make_examples("heldout_phrasing", 2, tasks=[COMBO])[0].edits[0] in \
        synthetic.PHRASINGS["brighten"]["heldout"]


def test_parse_edits_accepts_lists_and_json_and_refuses_the_rest():
    assert parse_edits(None) == parse_edits("") == parse_edits([]) == ()
    assert parse_edits(["make it brighter", "shift it left"]) == ("make it brighter", "shift it left")
    assert parse_edits('["a", "b"]') == ("a", "b")  # a CSV cell
    for bad in ("make it brighter", '{"a": 1}', ["ok", ""], ["ok", 3], 5):
        with pytest.raises(BadRow, match="bad edits"):
            parse_edits(bad)


def test_plan_sums_each_rows_edits_and_pads_with_zeros():
    batch = {"instruction": ["both", "one", "both again"], "edits": [("a", "b"), (), ("c", "d")]}
    plan = EditPlan.of(batch)
    assert plan.texts == ["a", "b", "one", "c", "d"] and plan.owner.tolist() == [0, 0, 1, 2, 2]
    assert EditPlan.of({"instruction": ["x"], "edits": [()]}) is None
    torch.manual_seed(0)
    r, d_in, d_out = 3, 5, 4
    per_edit = GeneratedLoRA({"l": (torch.randn(5, r, d_in), torch.randn(5, d_out, r))}, 0.5)
    chained = plan.chain(per_edit)
    a, b = chained.weights["l"]
    assert a.shape == (3, 2 * r, d_in) and b.shape == (3, d_out, 2 * r)
    ea, eb = per_edit.weights["l"]
    delta = lambda i: eb[i] @ ea[i]  # noqa: E731
    for row, edits in ((0, [0, 1]), (1, [2]), (2, [3, 4])):
        assert torch.allclose(b[row] @ a[row], sum(delta(i) for i in edits), atol=1e-5), row
    assert chained.scale == 0.5


def test_plan_counts_the_generators_shared_rank_once_per_row():
    """data.chain_shared: once: a row's second edit adds its LoRA without the shared rank (the
    generator joins it last), as Generate LoRA with include_shared off does in the second edit of
    a chain; a row of one edit keeps its whole LoRA."""
    batch = {"instruction": ["both", "one"], "edits": [("a", "b"), ()]}
    shared, r, d_in, d_out = 2, 5, 6, 4  # rank 5 = 3 generated + 2 shared
    torch.manual_seed(0)
    per_edit = GeneratedLoRA({"l": (torch.randn(3, r, d_in), torch.randn(3, d_out, r))}, 0.5)
    ea, eb = per_edit.weights["l"]
    a, b = EditPlan.of(batch, shared_once=shared).chain(per_edit).weights["l"]
    assert a.shape == (2, 2 * r - shared, d_in)
    keep = r - shared
    assert torch.allclose(b[0] @ a[0], eb[0] @ ea[0] + eb[1, :, :keep] @ ea[1, :keep], atol=1e-5)
    assert torch.allclose(b[1] @ a[1], eb[2] @ ea[2], atol=1e-5)
    a2, b2 = EditPlan.of(batch).chain(per_edit).weights["l"]  # per_edit: the whole LoRAs summed
    assert torch.allclose(b2[0] @ a2[0], eb[0] @ ea[0] + eb[1] @ ea[1], atol=1e-5)
    assert not torch.allclose(b2[0] @ a2[0], b[0] @ a[0], atol=1e-3)


def test_chaining_follows_the_config(tmp_path):
    cfg = tiny_config("sd15_ip2p", tmp_path, generator={"shared_rank": 3})
    assert cfg.data.chain_shared == "once" and Chaining.of(cfg, "hywu") == Chaining(3)
    assert Chaining.of(cfg, "shared_lora") is None
    cfg.data.chain_shared = "per_edit"
    assert Chaining.of(cfg, "hywu") == Chaining(0)
    cfg.data.chain_edits = False
    assert Chaining.of(cfg, "hywu") is None
    cfg.data.chain_edits, cfg.data.chain_shared = True, "twice"
    with pytest.raises(ConfigError, match="data.chain_shared 'twice' is not one of once, per_edit"):
        validate(cfg)


@pytest.fixture
def generator_calls(monkeypatch):
    """The batch size and text of every condition the generator is called with."""
    calls = []
    forward = HYWUGenerator.forward

    def watched(self, cond):
        calls.append(cond.batch_size)
        return forward(self, cond)

    monkeypatch.setattr(HYWUGenerator, "forward", watched)
    return calls


@pytest.mark.parametrize("chain", [True, False])
def test_the_trainer_feeds_the_generator_one_condition_per_edit(tmp_path, generator_calls, chain):
    """Tasks brighten / brighten+shift_left alternate: a batch of 4 rows holds 2 + 2 * 2 = 6 edits."""
    torch.set_num_threads(1)
    cfg = tiny_config("sd15_ip2p", tmp_path, train={"max_steps": 2, "batch_size": 4, "validate_every": 0},
                      data={"tasks": ["brighten", COMBO], "n_train": 8, "n_val": 2, "chain_edits": chain})
    summary = run(cfg, progress=False)
    assert summary["steps"] == 2 and all(x is not None for x in summary["losses"])
    train_calls = generator_calls[:2]  # the two steps come first; validation after
    assert train_calls == ([6, 6] if chain else [4, 4])
    val = generator_calls[2:]
    assert val and all(n == (3 if chain else 2) for n in val), val  # val rows: brighten, then the combination


def test_a_manifest_row_with_bad_edits_is_skipped_and_counted(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (120, 60, 30)).save(img)
    rows = [{"source": "a.png", "target": "a.png", "instruction": "make it brighter and shift it left",
             "edits": ["make it brighter", "shift it left"]},
            {"source": "a.png", "target": "a.png", "instruction": "x", "edits": "not a list"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config("sd15_ip2p", tmp_path / "out", data={"source": "manifest", "path": str(manifest),
                                                            "val_fraction": 0.0})
    ds, _ = build_datasets(cfg)
    assert ds.load(0, 16)["edits"] == ("make it brighter", "shift it left")
    with pytest.raises(BadRow, match="bad edits"):
        ds.load(1, 16)
    with pytest.raises(BadRow, match="bad edits"):  # what the pre-flight reads: it finds the row before training
        ds.images(1)


@pytest.mark.parametrize("family", ["sd15_ip2p", "flux_kontext", "qwen_image_edit"])
def test_each_edits_condition_is_what_sampling_encodes_for_that_sentence(family, tmp_path, generator_calls):
    """The training condition of edit k (the row's source latent, the edit's text) equals the
    family's sampling-time condition for that image and sentence, which the family parity tests
    hold equal to HY-WU Condition Encode in ComfyUI; and a short chained run trains."""
    from trainer.data import collate
    from trainer.families import load_family
    from trainer.tiny_bases import build_tiny_base

    torch.set_num_threads(1)
    cfg = tiny_config(family, tmp_path / "run", train={"max_steps": 1, "batch_size": 2, "validate_every": 0},
                      data={"tasks": ["brighten", COMBO], "n_train": 4, "n_val": 2})
    build_tiny_base(family, cfg.base.path, seed=0)
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    ds, _ = build_datasets(cfg)
    batch = collate([ds.load(i, cfg.base.resolution) for i in range(2)])
    plan = EditPlan.of(batch)
    assert plan.texts == [batch["instruction"][0], *batch["edits"][1]]
    trained = plan.condition(adapter, adapter.encode(batch))
    sampled = plan.image_condition(adapter, batch["source"])
    assert trained.batch_size == 3 and trained.tokens.keys() == sampled.tokens.keys()
    for k in trained.tokens:
        assert torch.allclose(trained.tokens[k], sampled.tokens[k], atol=1e-5), k
    assert run(cfg, progress=False)["steps"] == 1 and generator_calls[0] == 3


@pytest.mark.parametrize("cache_mb", [2048.0, 0.0])
def test_qwen_image_edit_trains_chained_rows(tmp_path, generator_calls, cache_mb):
    """Its text encoder reads the image, so each edit is encoded with its row's source: from the
    row cache, or per step without it (data.cache_mb: 0); a batch of 2 rows (one combination)
    feeds the generator 3 conditions."""
    torch.set_num_threads(1)
    cfg = tiny_config("qwen_image_edit", tmp_path / "run", train={"max_steps": 1, "batch_size": 2, "validate_every": 0},
                      data={"tasks": ["brighten", COMBO], "n_train": 4, "n_val": 2, "cache_mb": cache_mb})
    summary = run(cfg, progress=False)
    assert summary["steps"] == 1 and generator_calls[0] == 3


@pytest.mark.parametrize("family", ["sd15_ip2p", "flux_kontext", "qwen_image_edit"])
def test_the_row_cache_keeps_each_edits_text(family, tmp_path, monkeypatch):
    """EncodedRows encodes every edit's sentence once with the rows (per row where the text sees
    the image), only what the generator reads of it (for Qwen one Qwen2.5-VL pass per edit, no
    negative, no reference latent), so a chained row calls no text encoder per step, and the
    generator's condition from it equals the one encoded per step; the edits survive the disk
    cache, and a cache file written without them falls back to encoding them per step."""
    import dataclasses

    from trainer.encoded import EncodedRows
    from trainer.families import load_family

    torch.set_num_threads(1)
    cfg = tiny_config(family, tmp_path / "run", data={"tasks": ["brighten", COMBO], "n_train": 4, "n_val": 2})
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    ds, _ = build_datasets(cfg)
    passes = []
    if adapter.text_sees_image:
        adapter.text_encoder.register_forward_hook(lambda *_: passes.append(1))  # Qwen2.5-VL
    rows = EncodedRows(adapter, ds, cfg.base.resolution, max_mb=64).fill(tmp_path / "rows.safetensors")
    decoded = [ds.load(i, cfg.base.resolution) for i in range(4)]
    instructions = {rows._text_key(i, d["instruction"]) for i, d in enumerate(decoded)}
    edits = {rows._text_key(i, e) for i in range(4) for e in ds.edits(i)} - instructions
    assert rows.summary()["instructions"] == len(instructions) and rows.summary()["edits"] == len(edits) > 0
    if adapter.text_sees_image:  # an instruction: itself and the empty negative; an edit: itself only
        assert len(passes) == 2 * len(instructions) + len(edits)
        assert all(len(item) == 2 for item in rows.edit_texts.values())
    batch = rows.collate([rows.load(i) for i in range(4)], {})
    plan = EditPlan.of(batch)
    assert plan.text_items is not None and len(plan.text_items) == len(plan.texts) == 6
    encoded, passes[:] = [], []
    generator_text = adapter.generator_text_items
    monkeypatch.setattr(adapter, "generator_text_items",
                        lambda texts, *images: encoded.append(texts) or generator_text(texts, *images))
    cached = plan.condition(adapter, batch["enc"])
    assert encoded == [] and passes == []
    sources = torch.stack([d["source"] for d in decoded])  # what a batch without the row cache carries
    now = dataclasses.replace(plan, text_items=None, sources=sources).condition(adapter, batch["enc"])
    assert encoded == [plan.texts] and cached.tokens.keys() == now.tokens.keys()
    if adapter.text_sees_image:  # one Qwen2.5-VL pass per edit: no empty negative, which only the base reads
        assert len(passes) == len(plan.texts)
    for k in cached.tokens:
        assert torch.allclose(cached.tokens[k], now.tokens[k], atol=1e-6), k
    again = EncodedRows(adapter, ds, cfg.base.resolution, max_mb=64).fill(tmp_path / "rows.safetensors")
    assert again.source and again.edit_texts.keys() == rows.edit_texts.keys()
    read = EditPlan.of(again.collate([again.load(i) for i in range(4)], {})).condition(adapter, batch["enc"])
    for k in cached.tokens:
        assert torch.equal(cached.tokens[k], read.tokens[k]), k
    rows.edit_texts.clear()  # an older cache file: the instructions only
    assert rows.collate([rows.load(i) for i in range(4)], {})["edit_text"] is None
