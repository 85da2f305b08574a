"""Pre-encoded rows: the cached encodings give the same training inputs as encoding each batch,
bad rows stay bad rows, and a dataset beyond the memory budget streams from disk shards (or, without a
cache_dir, is not cached at all)."""
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
    assert EncodedRows(adapter, train, cfg.base.resolution, max_mb=0.01, chunk=64).fill() is None  # one chunk: checked too


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
    key = cache_key(cfg, torch.float32)
    cfg.base.buckets = "template"  # other image sizes
    assert cache_key(cfg, torch.float32) != key


def test_cache_key_of_a_folders_dataset_follows_its_files(tmp_path):
    """A folders dataset is its files: an edited image, instruction or source gives another key."""
    from mixed_aspect import mixed_aspect_folders
    from trainer.encoded import cache_key

    data = mixed_aspect_folders(tmp_path / "pairs", 3)
    cfg = tiny_config("sd15_ip2p", tmp_path / "out", data={"source": "folders", "path": str(data), "n_train": None})
    keys = {cache_key(cfg, torch.float32)}
    for f in (data / "target" / "001.txt", data / "control" / "002.png"):
        f.write_bytes(f.read_bytes() + b" ")  # one more byte: another size
        keys.add(cache_key(cfg, torch.float32))
    assert len(keys) == 3


def _same_item(a: dict, b: dict) -> None:
    assert a["instruction"] == b["instruction"] and a["task"] == b["task"] and a["edits"] == b["edits"]
    for k in ("source", "target", "condition_source"):
        assert (k in a) == (k in b) and (k not in a or torch.equal(a[k], b[k])), k
    ta, tb = (x if isinstance(x, tuple) else (x,) for x in (a["text"], b["text"]))
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    ea, eb = a["edit_text"], b["edit_text"]
    flat = lambda items: [t for it in items for t in (it if isinstance(it, tuple) else (it,))]  # noqa: E731
    assert len(ea) == len(eb) and all(torch.equal(x, y) for x, y in zip(flat(ea), flat(eb)))


def test_a_dataset_over_the_budget_streams_from_disk_shards(tmp_path):
    """Over data.cache_mb with a cache_dir: encoded once into shards that each fit the budget and read back row by
    row; every row equals the in-memory encoding (SD1.5: texts shared across rows; Qwen-Image-Edit: text per row,
    template buckets of three sizes, a bad row), a second fill reads the shards, and a training run on the streamed
    rows gives the in-memory run's losses."""
    from mixed_aspect import mixed_aspect_folders
    from trainer.encoded import StreamedRows, cache_key
    from trainer.train import run

    data = mixed_aspect_folders(tmp_path / "pairs", 12)
    (data / "target" / "005.txt").unlink()  # a bad row
    per_row = {}
    for family in ("sd15_ip2p", "qwen_image_edit"):
        base = {"buckets": "template", "megapixels": 0.01} if family == "qwen_image_edit" else {}
        cfg = tiny_config(family, tmp_path / family, base=base,
                          data={"source": "folders", "path": str(data), "n_train": None, "val_fraction": 0.0})
        adapter = load_family(cfg, torch.device("cpu"), torch.float32)
        train, _ = build_datasets(cfg)
        memory = EncodedRows(adapter, train, cfg.base.resolution, max_mb=256, chunk=2).fill()
        path = tmp_path / f"enc-{family}" / f"encoded-{cache_key(cfg, torch.float32)}.safetensors"
        per_row[family] = memory.nbytes / len(memory.rows)
        streamed = EncodedRows(adapter, train, cfg.base.resolution, max_mb=4.5 * per_row[family] / 2**20, chunk=2).fill(path)
        memory = EncodedRows(adapter, train, cfg.base.resolution, max_mb=256, chunk=2).fill()  # the same chunks
        assert isinstance(streamed, StreamedRows) and streamed.shard_rows == 4
        assert len(list(streamed.folder.glob("part-*.safetensors"))) == 3 and not path.is_file()
        again = EncodedRows(adapter, train, cfg.base.resolution, max_mb=256).fill(path)
        assert isinstance(again, StreamedRows) and again.summary()["from_disk"] == str(streamed.folder)
        for i in range(len(train)):
            if i in memory.bad:
                assert i in streamed.bad and i in again.bad
                continue
            _same_item(memory.load(i), streamed.load(i))
            _same_item(memory.load(i), again.load(i))
    # the trainer on streamed rows (SD1.5, 40 rows: shards of the default 16-row chunks): the in-memory run's losses
    data = mixed_aspect_folders(tmp_path / "pairs40", 40)
    settings = {"max_steps": 3, "batch_size": 2, "validate_every": 0, "log_every": 1}
    runs = []
    for name, cache in (("memory", {}), ("disk", {"cache_mb": 20 * per_row["sd15_ip2p"] / 2**20, "cache_dir": str(tmp_path / "c")})):
        c = tiny_config("sd15_ip2p", tmp_path / name, train=settings,
                        data={"source": "folders", "path": str(data), "n_train": None, "val_fraction": 0.0, **cache})
        runs.append(run(c, progress=False))
    assert runs[1]["encoded_rows"]["shards"] >= 2 and "streamed_from" not in runs[0]["encoded_rows"]
    assert runs[1]["losses"] == runs[0]["losses"]
