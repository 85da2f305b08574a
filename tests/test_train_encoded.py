"""Pre-encoded rows: the cached encodings give the same training inputs as encoding each batch,
bad rows stay bad rows, and a dataset beyond the memory budget is not cached at all."""
import torch

from trainer.data import BadRow, BatchStream, EditDataset, build_datasets
from trainer.encoded import EncodedRows
from trainer.families import load_family
from trainer.tiny_bases import tiny_config


def _setup(tmp_path, n=10):
    cfg = tiny_config("sd15_ip2p", tmp_path, data={"n_train": n}, train={"drop_text": 0.3, "drop_image": 0.3})
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    train, _ = build_datasets(cfg)
    return cfg, adapter, train


def test_cached_batches_equal_encoded_batches(tmp_path):
    cfg, adapter, train = _setup(tmp_path)
    rows = EncodedRows(adapter, train, cfg.base.resolution, max_mb=64, chunk=4).fill()
    assert rows.summary()["rows"] == 10
    plain = BatchStream(train, 3, cfg.base.resolution, seed=0)
    cached = BatchStream(train, 3, cfg.base.resolution, seed=0, load=rows.load, collate_fn=rows.collate)
    for step in range(4):  # crosses an epoch (10 rows, batches of 3)
        a, b = plain.next_batch(), cached.next_batch()
        assert a["instruction"] == b["instruction"] and torch.equal(a["task_id"], b["task_id"])
        keys = [step * 3 + j for j in range(3)]
        pa, pb = adapter.prepare(a, step, keys), adapter.prepare_encoded(b["enc"], step, keys)
        for k in ("x", "t", "text", "target"):
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
        for name in ("text", "image"):
            torch.testing.assert_close(pa["condition"].tokens[name], pb["condition"].tokens[name], rtol=1e-5, atol=1e-6)


def test_draws_repeat_examples_with_their_own_noise(tmp_path):
    cfg, adapter, train = _setup(tmp_path, n=4)
    rows = EncodedRows(adapter, train, cfg.base.resolution, max_mb=64).fill()
    enc = rows.collate([rows.load(i) for i in range(2)], {})["enc"]
    prep = adapter.prepare_encoded(enc, 0, [0, 1, 2, 3])  # 2 examples x 2 draws, draw-major
    assert prep["condition"].batch_size == 2 and prep["x"].shape[0] == 4
    assert torch.equal(prep["x"][0, 4:], prep["x"][2, 4:]) or prep["x"][2, 4:].abs().sum() == 0  # same source (unless dropped)
    assert not torch.equal(prep["x"][0, :4], prep["x"][2, :4])  # another noise draw


def test_bad_rows_and_budget(tmp_path):
    cfg, adapter, train = _setup(tmp_path, n=6)
    broken = EditDataset(train.rows[:3] + [{"instruction": "x"}] + train.rows[3:], None)
    rows = EncodedRows(adapter, broken, cfg.base.resolution, max_mb=64, chunk=2).fill()
    try:
        rows.load(3)
        raise AssertionError("a row without images must raise BadRow")
    except BadRow as e:
        assert "missing source/target" in str(e)
    stream = BatchStream(broken, 7, cfg.base.resolution, seed=0, load=rows.load, collate_fn=rows.collate)
    stream.next_batch()
    assert stream.skipped == {"missing source/target": 1}  # counted by the stream, once, as without the cache
    assert EncodedRows(adapter, train, cfg.base.resolution, max_mb=0.01, chunk=2).fill() is None


def test_disk_cache_roundtrip_and_key(tmp_path):
    from trainer.encoded import cache_key

    cfg, adapter, train = _setup(tmp_path, n=5)
    path = tmp_path / "enc" / f"encoded-{cache_key(cfg, torch.float32)}.safetensors"
    first = EncodedRows(adapter, train, cfg.base.resolution, max_mb=64, chunk=2).fill(path)
    assert path.is_file() and first.summary()["from_disk"] is None
    again = EncodedRows(adapter, train, cfg.base.resolution, max_mb=64).fill(path)
    assert again.summary()["from_disk"] == str(path) and again.summary()["rows"] == 5
    for i in range(5):
        a, b = first.load(i), again.load(i)
        assert a["instruction"] == b["instruction"] and a["task"] == b["task"]
        assert torch.equal(a["source"], b["source"]) and torch.equal(a["target"], b["target"]) 
        assert len(a["text"]) == len(b["text"]) == 2  # UNet context, prompt mask
        assert all(torch.equal(x, y) for x, y in zip(a["text"], b["text"]))
    cfg.data.n_train = 6  # other data -> another file
    assert cache_key(cfg, torch.float32) != path.stem.split("-", 1)[1]
    assert cache_key(cfg, torch.bfloat16) != cache_key(cfg, torch.float32)
    key = cache_key(cfg, torch.float32)
    cfg.base.text_layer = -2  # the generator reads another layer: other encodings
    assert cache_key(cfg, torch.float32) != key
