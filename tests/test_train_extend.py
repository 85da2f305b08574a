"""`python -m trainer.train --init-from FILE`: continue a generator file on new data (with replay),
or start a generator from a static LoRA (trainer/init_from.py, trainer/replay.py).

Tiny seeded bases, real diffusers models, real safetensors files. The last test trains on the
micro SD1.5-IP2P base that ComfyUI loads, extends the generator, and runs the extended file
through HY-WU Load Generator -> Generate -> Apply -> KSampler in the session's real server.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hywu_nodes.core import load_generator, read_generator_info
from trainer.config import ConfigError
from trainer.tiny_bases import tiny_config
from trainer.train import main, parse_args, run

OLD, NEW = ["brighten", "darken"], ["warm", "cool"]


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A 3-step generator on two old tasks, with every generator option on (statistics in the file)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("parent")
    cfg = tiny_config("sd15_ip2p", out, train={"max_steps": 3},
                      generator={"condition_norm": "token", "shared_rank": 2, "film": True, "token_width": 8},
                      data={"tasks": OLD, "n_train": 8})
    return run(cfg, progress=False)["files"][0]


def _extend_args(parent, out, *extra):
    return ["--init-from", str(parent), "--output", str(out), "--data.tasks=[warm,cool]", "--data.n_train=8",
            "--data.n_val=2", "--train.batch_size=4", *extra]


def test_extend_keeps_the_files_settings_and_mixes_replay(parent, tmp_path):
    src = read_generator_info(parent)
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "ext", "--max-steps", "2", "--data.replay.fraction=0.25",
                                     "--data.replay.sources=[{source: synthetic, tasks: [brighten, darken], n_train: 8}]"))
    # no --config: the file's settings over the defaults, not the demo config's
    assert cfg.base.family == "sd15_ip2p" and cfg.base.path == src.extra["base_path"] and cfg.name == src.extra["name"]
    for k in ("rank", "alpha", "token_width", "row_tokens", "condition_norm", "shared_rank", "film"):
        assert getattr(cfg.generator, k) == getattr(src.config, k), k
    assert cfg.base.text_tokens == 77 and cfg.train.method == "hywu" and cfg.base.targets is None
    summary = run(cfg, progress=False)
    assert summary["replay_rows"] == 3  # 8 new rows, 25% replay: 3 / 11
    assert summary["init_from"] == {"file": parent.rsplit("/", 1)[-1], "kind": "generator", "steps": 3,
                                    "name": src.extra["name"], "parent": None}
    out = read_generator_info(summary["files"][0])
    assert out.config == src.config and out.base_family == src.base_family and out.format_version == src.format_version
    assert out.target_spec.fingerprint == src.target_spec.fingerprint  # the file's layers, not the family default
    assert out.condition_spec == src.condition_spec
    assert out.extra["init_from"]["steps"] == 3 and out.extra["steps"] == 2
    a, b = _tensors(parent), _tensors(summary["files"][0])
    assert a.keys() == b.keys()
    stats = [k for k in a if k.startswith("cond_") and ("mean" in k or "std" in k)]
    assert stats and all(torch.equal(a[k], b[k]) for k in stats)  # statistics kept, not recomputed on the new data
    assert not torch.equal(a["head_b.weight"], b["head_b.weight"])  # it trained
    # the replay rows' tasks are in the training set: a per-task method would see all four
    from trainer.data import build_datasets
    from trainer.replay import mix
    assert mix(build_datasets(cfg)[0], cfg).tasks == sorted(OLD + NEW)


def test_distillation_keeps_the_parents_loras_on_replay_rows_only(parent):
    """trainer/distill.py: zero for the parent's own LoRAs, positive for others, only replay rows
    count, and its gradient pulls a drifted generator back to the parent."""
    from hywu_nodes.core import Condition
    from trainer.distill import ReplayDistillation

    torch.manual_seed(0)
    gen, info = load_generator(parent)
    d = ReplayDistillation(gen, weight=2.0, seed=0)
    cond = Condition({s.name: torch.randn(4, s.max_tokens, s.width) for s in info.condition_spec.sources})
    replay = torch.tensor([False, True, False, True])
    with torch.no_grad():
        assert d.loss(gen(cond), cond, replay, step=0).item() < 1e-9  # (a sub-batch: equal up to rounding)
    assert d.loss(gen(cond), cond, torch.zeros(4, dtype=torch.bool), step=0) is None  # no replay rows: no term
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))
    first = d.loss(gen(cond), cond, replay, step=0)
    assert first.item() > 0
    other = Condition({k: v.clone() for k, v in cond.tokens.items()})
    for v in other.tokens.values():
        v[0] += 5.0  # a new-data row: not part of the term
    assert d.loss(gen(other), other, replay, step=0).item() == pytest.approx(first.item(), rel=1e-5)
    opt = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(30):
        opt.zero_grad()
        d.loss(gen(cond), cond, replay, step=1).backward()  # fixed probes: a fixed objective
        opt.step()
    assert d.loss(gen(cond), cond, replay, step=1).item() < 0.5 * first.item()
    assert all(not p.requires_grad for p in d.parent.parameters())


def test_distillation_with_chained_replay_rows_compares_each_edits_lora(parent, tmp_path, monkeypatch):
    """Replay rows with `edits` (trainer/edits.py): the term compares the LoRA the generator writes for
    each edit with the parent's for that edit (zero at lr 0), while the base trains on their sum."""
    from hywu_nodes.core import HYWUGenerator

    sizes = []
    forward = HYWUGenerator.forward
    monkeypatch.setattr(HYWUGenerator, "forward", lambda self, cond: sizes.append(cond.batch_size) or forward(self, cond))
    replay = ["--data.replay.fraction=0.5",
              "--data.replay.sources=[{source: synthetic, tasks: [brighten, brighten+shift_left], n_train: 8}]"]
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "c0", "--max-steps", "2", "--train.lr=0", *replay,
                                     "--data.replay.distill=1.0", "--train.validate_every=0"))
    summary = run(cfg, progress=False)
    # zero up to float rounding: parent and child write the same LoRAs, in batches of other sizes (some
    # CPUs' matmul kernels then round the last bits differently: 2e-14 seen)
    assert summary["replay_distill_last"] == pytest.approx(0.0, abs=1e-9) and summary["replay_distill_rows_seen"] > 0
    assert any(n > cfg.train.batch_size for n in sizes), sizes  # a batch held a combination: more edits than rows
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "c1", "--max-steps", "3", "--train.lr=0.02", *replay,
                                     "--data.replay.distill=1.0", "--train.validate_every=0"))
    assert run(cfg, progress=False)["replay_distill_last"] > 1e-6


def test_extension_with_distillation_runs_and_is_refused_where_it_cannot_act(parent, tmp_path):
    replay = ["--data.replay.fraction=0.5", "--data.replay.sources=[{source: synthetic, tasks: [brighten, darken], n_train: 8}]"]
    from trainer.data import build_datasets
    from trainer.replay import is_replay, mix

    cfg, _ = parse_args(_extend_args(parent, tmp_path / "d0", "--max-steps", "2", "--train.lr=0", *replay,
                                     "--data.replay.distill=1.0"))
    mixed = mix(build_datasets(cfg)[0], cfg)
    assert is_replay(mixed, torch.arange(len(mixed))).tolist() == [False] * 8 + [True] * 8
    # lr 0: the generator is its parent (zero up to float rounding, see above)
    assert run(cfg, progress=False)["replay_distill_last"] == pytest.approx(0.0, abs=1e-9)
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "d1", "--max-steps", "3", "--train.lr=0.02", *replay,
                                     "--data.replay.distill=1.0"))
    drifted = run(cfg, progress=False)
    assert drifted["replay_distill_last"] > 1e-6  # it drifted, and the term saw it
    seen = drifted["replay_distill_rows_seen"]
    assert seen > 0
    # data.replay.distill_rows: the same run, the same diffusion batches, 5 more replay rows per step for the term
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "d2", "--max-steps", "3", "--train.lr=0.02", *replay,
                                     "--data.replay.distill=1.0", "--data.replay.distill_rows=5"))
    summary = run(cfg, progress=False)
    assert summary["replay_distill_rows_seen"] == seen + 3 * 5 and summary["replay_distill_last"] > 0
    assert read_generator_info(summary["files"][0]).config == read_generator_info(parent).config
    with pytest.raises(ConfigError, match="distill_rows adds rows to the distillation term"):
        parse_args(_extend_args(parent, tmp_path, *replay, "--data.replay.distill_rows=4"))
    with pytest.raises(ConfigError, match="distill_rows must be a whole number"):
        parse_args(_extend_args(parent, tmp_path, *replay, "--data.replay.distill=1", "--data.replay.distill_rows=-1"))
    with pytest.raises(ConfigError, match="needs data.replay.fraction > 0"):
        parse_args(_extend_args(parent, tmp_path, "--data.replay.distill=1.0"))
    with pytest.raises(ConfigError, match="needs --init-from a generator file and train.method hywu"):
        parse_args(["--data.replay.distill=1.0", *replay])
    with pytest.raises(ConfigError, match="must be >= 0"):
        parse_args(_extend_args(parent, tmp_path, *replay, "--data.replay.distill=-1"))


def test_extend_starts_exactly_from_the_file(parent, tmp_path):
    """lr 0: the written generator is the parent, tensor for tensor (weights, stats, heads)."""
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "same", "--max-steps", "1", "--train.lr=0"))
    out = run(cfg, progress=False)["files"][0]
    a, b = _tensors(parent), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_conflicting_options_are_refused_with_both_values(parent, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"generator\.rank: the config sets 8, tiny_sd15_ip2p\.safetensors has 4"):
        parse_args(_extend_args(parent, tmp_path, "--generator.rank=8"))
    with pytest.raises(ConfigError, match=r"train\.method: the config sets 'shared_lora'.* has 'hywu'"):
        parse_args(_extend_args(parent, tmp_path, "--method", "shared_lora"))
    # a value the user set explicitly counts even when it is the default (rank 4 is; token_width 16 is the preset's)
    with pytest.raises(ConfigError, match=r"generator\.token_width: the config sets 16, .* has 8"):
        parse_args(_extend_args(parent, tmp_path, "--generator.token_width=16"))
    # the demo config disagrees on several keys: all are listed
    with pytest.raises(ConfigError) as e:
        parse_args(_extend_args(parent, tmp_path, "--config", "trainer/configs/demo.yaml"))
    assert all(k in str(e.value) for k in ("generator.rank: the config sets 8", "generator.token_width: the config sets 256"))
    assert main(_extend_args(parent, tmp_path, "--generator.film=false")) == 2
    assert "generator.film: the config sets False, tiny_sd15_ip2p.safetensors has True" in capsys.readouterr().err
    # targets: the file's layers; another selection is refused once the base is loaded
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "t", "--max-steps", "1", "--base.targets=[attn1.to_q]"))
    with pytest.raises(ConfigError, match=r"base.targets \['attn1.to_q'\] selects \d+ layers, the file was trained on"):
        run(cfg, progress=False)
    # in-process callers get the same check: a non-default value that disagrees is refused
    cfg = tiny_config("sd15_ip2p", tmp_path / "x", generator={"shared_rank": 3}, train={"init_from": str(parent)})
    with pytest.raises(ConfigError, match=r"generator\.shared_rank: the config sets 3, .* has 2"):
        run(cfg, progress=False)


def test_how_the_base_was_run_comes_from_the_file(parent):
    """Settings a family records in the file's extra (FLUX's embedded guidance) are fixed too."""
    import dataclasses

    from trainer.init_from import open_source, resolve_config

    src = open_source(str(parent))
    src.info = dataclasses.replace(src.info, base_family="flux_kontext", extra={**src.info.extra, "flux_guidance": 3.5})
    cfg = tiny_config("sd15_ip2p", "unused")
    cfg.base.family = "flux_kontext"
    resolve_config(cfg, src, explicit=set())
    assert cfg.base.guidance == 3.5
    cfg.base.guidance = 2.5
    with pytest.raises(ConfigError, match=r"base\.guidance: the config sets 2\.5, .* has 3\.5"):
        resolve_config(cfg, src, explicit={"base.guidance"})


def test_files_that_are_not_generators_or_kohya_loras_are_refused(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        parse_args(["--init-from", str(tmp_path / "x.pt")])
    with pytest.raises(ConfigError, match="file not found"):
        parse_args(["--init-from", str(tmp_path / "missing.safetensors")])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(ConfigError, match="neither a HY-WU generator file nor a LoRA in the kohya layout"):
        parse_args(["--init-from", str(tmp_path / "ckpt.safetensors")])
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2)}
    save_file(te, str(tmp_path / "te.safetensors"))
    with pytest.raises(ConfigError, match="adapts the text encoder too"):
        parse_args(["--init-from", str(tmp_path / "te.safetensors")])


def test_static_lora_becomes_the_shared_rank(tmp_path):
    """A kohya LoRA (the trainer's shared_lora file, its alpha changed and B compensated, so its scale
    is not the generator's) is the generator's LoRA for every request at step 0."""
    torch.set_num_threads(1)
    cfg = tiny_config("sd15_ip2p", tmp_path / "lora", train={"max_steps": 2, "method": "shared_lora", "lr": 0.05},
                      data={"tasks": OLD, "n_train": 8})
    lora_file = run(cfg, progress=False)["files"][0]
    state = load_file(lora_file)
    for k in [k for k in state if k.endswith(".alpha")]:  # alpha x3 and up / 3: same update, another scale
        state[k] = state[k] * 3
        up = k[: -len(".alpha")] + ".lora_up.weight"
        state[up] = state[up] / 3
    save_file(state, str(tmp_path / "user_lora.safetensors"))
    lora_layers = {k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")}

    gen_cfg, _ = parse_args(["--init-from", str(tmp_path / "user_lora.safetensors"), "--output", str(tmp_path / "g"),
                             f"--base.path={cfg.base.path}", "--max-steps", "1", "--train.lr=0", "--data.n_train=8",
                             "--data.n_val=2", "--generator.rank=2", "--generator.alpha=1"])
    assert gen_cfg.generator.shared_rank == 4 and gen_cfg.train.method == "hywu"
    out = run(gen_cfg, progress=False)["files"][0]
    info = read_generator_info(out)
    from hywu_nodes.core import lora_module_key
    assert {lora_module_key("sd15_ip2p", t.name) for t in info.target_spec.targets} == lora_layers  # the LoRA's layers
    assert info.extra["init_from"] == {"file": "user_lora.safetensors", "kind": "lora", "rank": 4}
    gen, _ = load_generator(out)
    from hywu_nodes.core import Condition
    cond = Condition({s.name: torch.randn(2, s.max_tokens, s.width) for s in info.condition_spec.sources})
    with torch.no_grad():
        lora = gen(cond)
    for t in info.target_spec.targets:
        key = lora_module_key("sd15_ip2p", t.name)
        want = float(state[f"{key}.alpha"]) / 4 * state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"]
        a, b = lora.weights[t.name]
        for i in range(2):  # every request gets the user's LoRA
            got = lora.scale * b[i] @ a[i]
            assert torch.allclose(got, want, atol=1e-6 * max(1.0, float(want.abs().max()))), t.name
    assert float(want.abs().max()) > 0  # the LoRA was trained: the check compares something
    # --method shared_lora: the LoRA itself continues (lr 0: the written LoRA makes the same update)
    cont, _ = parse_args(["--init-from", str(tmp_path / "user_lora.safetensors"), "--output", str(tmp_path / "c"),
                          f"--base.path={cfg.base.path}", "--max-steps", "1", "--train.lr=0", "--data.n_train=8",
                          "--data.n_val=2", "--method", "shared_lora"])
    assert cont.generator.rank == 4
    again = load_file(run(cont, progress=False)["files"][0])
    assert {k for k in again if k.endswith(".lora_down.weight")} == {f"{m}.lora_down.weight" for m in lora_layers}
    for m in lora_layers:
        got = float(again[f"{m}.alpha"]) / 4 * again[f"{m}.lora_up.weight"] @ again[f"{m}.lora_down.weight"]
        want = float(state[f"{m}.alpha"]) / 4 * state[f"{m}.lora_up.weight"] @ state[f"{m}.lora_down.weight"]
        assert torch.allclose(got, want, atol=1e-6 * max(1.0, float(want.abs().max()))), m
    with pytest.raises(ConfigError, match="not per_task_lora"):
        parse_args(["--init-from", str(tmp_path / "user_lora.safetensors"), "--method", "per_task_lora"])
    # the LoRA does not fit another selection of layers
    bad, _ = parse_args(["--init-from", str(tmp_path / "user_lora.safetensors"), "--output", str(tmp_path / "h"),
                         f"--base.path={cfg.base.path}", "--max-steps", "1", "--base.targets=[attn1.to_q]"])
    with pytest.raises(ConfigError, match="of the LoRA's layers are not in base.targets"):
        run(bad, progress=False)
    with pytest.raises(ConfigError, match=r"generator\.shared_rank: the config sets 2, user_lora\.safetensors has 4"):
        parse_args(["--init-from", str(tmp_path / "user_lora.safetensors"), "--generator.shared_rank=2"])


def test_extended_generator_runs_in_comfyui(hywu_env, micro_base, tmp_path):
    """Train on the micro base ComfyUI loads, extend with new tasks and 10% replay, then run the
    extended file through the demo graph (Load Generator -> Condition Encode -> Generate -> Apply ->
    KSampler) in the real server."""
    import hywu_graphs as g

    torch.set_num_threads(1)
    common = [f"--base.path={micro_base.diffusers_dir}", "--base.resolution=32", "--data.n_train=8", "--data.n_val=1",
              "--train.batch_size=2", "--max-steps", "2"]
    first, _ = parse_args(["--config", "trainer/configs/tiny_sd15.yaml", "--output", str(tmp_path / "a"),
                           "--base.targets=[attn2.to_v]", "--base.tiny=false", "--data.tasks=[brighten,darken]",
                           "--name=hywu_extend_parent", *common])
    parent = run(first, progress=False)["files"][0]
    ext, _ = parse_args(["--init-from", parent, "--output", str(tmp_path / "b"), "--data.tasks=[warm,cool]",
                         "--name=hywu_extended", "--data.replay.fraction=0.1",
                         "--data.replay.sources=[{source: synthetic, tasks: [brighten, darken], n_train: 8}]", *common])
    out = run(ext, progress=False)["files"][0]
    link = hywu_env.server.models_dir / "hywu" / "hywu_extended.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(out)
    entry = hywu_env.server.run(g.demo(instruction="make it warmer", generator=link.name, prefix="hywu_extended"))
    images = hywu_env.server.output_images(entry)
    assert len(images) == 1 and images[0].stat().st_size > 0


def test_freeze_shared_rank_keeps_the_shared_lora_and_trains_the_rest(parent, tmp_path):
    """train.freeze_shared_rank: an extension that leaves the part every request shares as the file has it."""
    cfg, _ = parse_args(_extend_args(parent, tmp_path / "frozen", "--max-steps", "2", "--train.lr=0.02",
                                     "--train.freeze_shared_rank=true"))
    a, b = _tensors(parent), _tensors(run(cfg, progress=False)["files"][0])
    shared = [k for k in a if k.startswith(("shared_a.", "shared_b."))]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    assert not torch.equal(a["head_b.weight"], b["head_b.weight"])  # the request-dependent part trained
    with pytest.raises(ConfigError, match="freeze_shared_rank keeps the generator's shared rank"):
        parse_args(["--method", "shared_lora", "--train.freeze_shared_rank=true"])
