"""Train an HY-WU generator (or a static-LoRA baseline) against a frozen diffusers base.

    python -m trainer.train                                   # built-in demo config
    python -m trainer.train --config trainer/configs/tiny_sd15.yaml --train.lr=3e-4
    python -m trainer.train --config my.yaml --resume         # continue from the latest complete checkpoint
    python -m trainer.train --config my.yaml --check-data     # only the data report (every row), no training
    accelerate launch --config_file trainer/configs/accelerate/multi_gpu.yaml -m trainer.train --config my.yaml

Only the generator trains: the base and its encoders are frozen (no grads, eval mode) and the
LoRA enters the base forward through the core's functional per-sample path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from hywu_nodes.core import Condition, build_target_spec, condition_statistics, describe, lora_patched

from .buckets import file_record
from .config import ConfigError, TrainConfig, load_config
from .data import BadRow, BatchStream, build_datasets, collate_groups, preview_rows
from .encoded import EncodedRows, cache_key
from .families import BaseFolderError, check_base, load_family, module_digest
from .families.libraries import LibraryVersionError, check_libraries
from .guard import NonFiniteGuard, TrainingDiverged
from .methods import build_method
from .preflight import DataError, check_data, is_main_process, print_check
from .distill import ReplayDistillation
from .edits import Chaining
from .replay import is_replay, old_rows
from .replay import mix as replay_mix
from .report import ESTIMATE_AFTER, estimate_line, loss_curve, random_base_kind, random_base_note, summary_lines, tensorboard_note
from .sharding import ensure_process_group, full_state_dict, shard
from .signals import EXIT_INTERRUPTED, StopRequest, resume_command
from .state import CheckpointWriteError, Group, latest_checkpoint, load_checkpoint, publish, save_checkpoint
from .offload import EncoderParking
from .validate import VAL_DRAWS, ValidationLoss

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
FALLBACK_CONFIG = CONFIG_DIR / "tiny_sd15.yaml"
VAL_LOSS_ROWS = 64  # held-out rows the validation loss uses (at most)

HELP_EPILOG = f"""
config keys (YAML sections; override any with --section.key=value):
  base.family        sd15_ip2p | flux_kontext | qwen_image_edit
  base.path          local diffusers folder of the frozen base (never a hub id)
  base.tiny          true: build a seeded tiny base into base.path if missing (tests/demo)
  base.synthetic_full  true: build the full-size architecture (trainer/architectures) with
                     seeded RANDOM weights instead of reading base.path (benchmarks only)
  base.resolution    the generator's square image condition (multiple of 16); with buckets
                     square also the size every training image is cropped to
  base.buckets       square | template: each row's images at the size the family's template
                     scale node gives its source (FluxKontextImageScale, ImageScaleToTotalPixels);
                     a batch shares one size
  base.megapixels    buckets template: ImageScaleToTotalPixels' megapixels (default: the template's)
  base.text_tokens   text condition length (default: 77 / 256 / 1024 by family)
  base.guidance      flux_kontext: embedded guidance in training (default 2.5, the template's
                     FluxGuidance); recorded in the generator file: set FluxGuidance to it
  base.vl_pixels, base.reference_pixels   qwen families: image area shown to Qwen2.5-VL / of
                     the reference latent (default: TextEncodeQwenImageEdit(Plus)'s 1024^2 / 384^2, 1024^2)
  base.targets       list of regexes of adapted linear layers (default: attention + FFN)
  base.weight_dtype  bf16 | fp8_e4m3fn | fp8_scaled: the denoiser's linear weights stored in fp8,
                     computed in bf16 (fp8_scaled: with per-tensor scales, as ComfyUI's fp8 scaled files)
  base.architecture  with base.synthetic_full, or a base.files file without a config in base.path:
                     which shipped architecture (e.g. flux2_klein_9b)
  base.files         {{transformer: file}}: ComfyUI's diffusion-model file (bf16 / fp8 / fp8 scaled)
                     instead of base.path/transformer (the DiT families)
  data.source        synthetic | manifest (.jsonl/.csv) | parquet (folder) | folders (target
                     images with same-name .txt instructions + control images of the same names)
  data.path          manifest file, parquet folder, or folders: a folder with target/ and control/
                     (or the targets, with data.control_path the sources; ai-toolkit's folder_path);
                     data.tasks (synthetic: which tasks)
  data.n_train       training rows: the first n usable rows (null: all; synthetic: 64 examples)
  data.val_fraction  share of the usable rows held out for validation (default 0.05), or
  data.val_path      a separate validation manifest / parquet folder; data.n_val: rows in the grid
  data.cache_mb      memory for rows encoded once before the first step (latents + text
                     features; default 2048, 0 = encode every batch)
  data.cache_dir     also keep those encodings on disk there (next run on the same base/data
                     loads them instead of encoding again); rows over data.cache_mb are
                     encoded once into shards there and read from disk
  data.replay.fraction, data.replay.sources   old data mixed into every epoch in this share
                     (sources: [{{source: synthetic|manifest|parquet|folders, path, tasks, n_train}}])
  data.replay.distill  with --init-from a generator: weight of a loss that keeps the LoRAs it
                     writes for the replay rows the file's own (default 0: off);
                     data.replay.distill_rows: that many rows of all the sources' data per batch
                     for this term alone (the generator runs on them, the base does not; default 0)
  train.freeze_shared_rank  hywu: do not train the generator's shared rank (e.g. when extending)
  train.init_from    (= --init-from FILE) continue a generator file: family, targets, condition
                     and generator settings come from it; or a kohya LoRA as the shared rank
  generator.preset   tiny | small | medium | large; generator.rank, generator.alpha,
                     generator.gradient_checkpointing, generator.token_width / row_tokens
  train.method       hywu | shared_lora | per_task_lora
  train.max_steps, train.batch_size (per process), train.grad_accum, train.lr,
  train.weight_decay, train.warmup_steps, train.lr_schedule (constant|cosine),
  train.max_grad_norm, train.seed, train.mixed_precision (no|fp16|bf16),
  train.device (auto|cpu|cuda), train.base_gradient_checkpointing,
  train.drop_text / train.drop_image (CFG dropout; default per family),
  train.timestep_sampling (logit_normal|uniform, flow families), train.snr_gamma (min-SNR, sd15_ip2p), train.save_every,
  train.keep_checkpoints, train.validate_every, train.validate_steps, train.log_every,
  train.samples      previews on your own images at each validation, with and without the LoRA:
                     [{{image: path, instruction: text}}] (ai-toolkit's ctrl_img / prompt accepted)
  train.draws_per_example (noise/timestep draws per example; one generated LoRA serves them),
  train.max_nonfinite (NaN/inf steps in a row that stop the run; each one is skipped),
  train.fsdp / train.fsdp_shard_base (FSDP2: shard the generator / also the frozen base)
  train.offload_encoders  text encoders + VAE to CPU memory once every row is encoded, back for
                     validation grids (default true; a no-op on a CPU)
  train.blocks_to_swap  the base's last N blocks live in CPU memory and are copied to the GPU
                     ahead of use, forward and backward (default 0: off)
  train.deterministic (default true: deterministic kernels, so the same config, seed and thread
                     count give the same weights; false: a little faster, not repeatable)

outputs (in --output):
  <name>.safetensors       the generator (what "HY-WU Load Generator" reads), or the LoRA(s)
  checkpoints/step-*/      resumable training state (sharded runs: one shard per process; resumes
                           in any process count); checkpoints/latest points at the newest
  samples/preview-*.png    train.samples: your image | base edit | edit with the generated LoRA
  samples/step-*.png       held-out rows: source | target | base edit | edit with the generated
                           LoRA, labelled, with the instruction
  loss.png                 train loss per step, validation loss, the base's validation loss
  summary.json             final train/validation loss (and the base's), steps, samples/s, peak
                           memory, the data check, skipped non-finite steps, failed checkpoint writes
Before any model loads the data is checked (every row; --check-data: only that report).
Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written and the --resume command
printed (exit code 75); a second signal exits at once (the last complete checkpoint is kept).
exit codes: 0 done, 2 configuration / base folder / data error, 3 diverged (non-finite steps) or a
checkpoint that had to be written could not be, 75 stopped by a signal (resumable)
With no arguments the demo config runs ({DEMO_CONFIG.relative_to(CONFIG_DIR.parent.parent) if DEMO_CONFIG.exists() else FALLBACK_CONFIG.name}).
"""


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0],
                                epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the built-in demo config)")
    p.add_argument("--output", help="output folder (= output: in the config)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in the output folder")
    p.add_argument("--init-from", metavar="FILE", help="continue training this generator file on new data (its settings are kept; a conflicting option is refused), or start from a kohya LoRA as the shared rank (= train.init_from)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (= train.max_steps)")
    p.add_argument("--seed", type=int, help="seed of weights init, data order, noise and dropout (= train.seed)")
    p.add_argument("--method", choices=("hywu", "shared_lora", "per_task_lora"), help="what to train (= train.method)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="= train.device")
    p.add_argument("--stop-after", type=int, help="checkpoint and exit after this many steps (continue later with --resume)")
    p.add_argument("--check-frozen", action="store_true", help="hash the frozen base/encoders before and after (debug; slow for big bases)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--check-data", action="store_true", help="scan every data row, print the report and exit (2: no usable rows)")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        p.error(f"unrecognised arguments {bad}; config overrides look like --train.lr=1e-4")
    path = args.config or str(DEMO_CONFIG if DEMO_CONFIG.exists() else FALLBACK_CONFIG)
    overrides = list(rest)
    for flag, key in (("output", "output"), ("max_steps", "train.max_steps"), ("seed", "train.seed"),
                      ("method", "train.method"), ("device", "train.device")):
        if getattr(args, flag) is not None:
            overrides.append(f"--{key}={getattr(args, flag)}")
    if args.init_from:  # the file fixes base, condition and generator settings; no demo config underneath
        from .init_from import config_for

        return config_for(args.init_from, args.config, overrides), args
    return load_config(path, overrides), args


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except (ImportError, AttributeError):
        return float("nan")


def _lr_lambda(cfg: TrainConfig):
    t = cfg.train

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        if t.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, t.max_steps) / t.max_steps))
        return warm

    return f


def _tensorboard(output: str, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(os.path.join(output, "tensorboard"))
    except Exception:  # tensorboard not installed: logging is optional
        return None


def condition_stats(adapter, dataset, rows, cfg: TrainConfig, batch: int = 64) -> dict:
    """Mean/std of the generator's condition over the first ``generator.norm_examples`` rows
    (from the pre-encoded rows when there are, else encoded here)."""
    def chunks():  # of one image size each (the rows of a bucketed run have several)
        pending: dict[tuple, list] = {}
        for i in range(min(len(dataset), cfg.generator.norm_examples)):
            try:
                item = rows.load(i) if rows else dataset.load(i, cfg.base.resolution)
            except BadRow:
                continue
            items = pending.setdefault(tuple(item["source"].shape), [])
            items.append(item)
            if len(items) == batch:
                yield pending.pop(tuple(item["source"].shape))
        yield from (items for items in pending.values() if items)

    def conditions():
        for items in chunks():
            if rows:
                enc = rows.collate(items, {})["enc"]
                yield adapter.encoded_condition(enc).to("cpu")
            else:
                yield adapter.encode_condition(torch.stack([r["source"] for r in items]), [r["instruction"] for r in items]).to("cpu")

    return condition_statistics(conditions(), adapter.condition_spec, cfg.generator.condition_norm)


def _finite_float(x) -> float:
    x = x.full_tensor() if hasattr(x, "full_tensor") else x  # a sharded gradient norm
    return float(x)


@contextmanager
def _deterministic(on: bool):
    """Deterministic kernels while training (CPU: two runs with 2 threads otherwise differ by ~1e-4
    after 12 steps on the micro base). warn_only: an op without a deterministic CUDA kernel warns
    instead of stopping the run. Restored afterwards (run() is called in-process by tests)."""
    import torch.utils.deterministic as det

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = det.fill_uninitialized_memory
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition for deterministic GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = False  # filling every torch.empty with NaN only costs time here
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = fill


class _Counting:
    """A dataset whose ``load`` ticks a progress bar (the one-off encoding of every row)."""

    def __init__(self, ds, bar):
        self._ds, self._bar = ds, bar

    def __len__(self):
        return len(self._ds)

    def load(self, i, resolution):
        try:
            return self._ds.load(i, resolution)
        finally:
            self._bar.update(1)

    def __getattr__(self, k):
        return getattr(self._ds, k)


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True, check_frozen: bool = False,
        stop_after: int | None = None, handle_signals: bool = False, argv: list[str] | None = None) -> dict:
    """Train per ``cfg``; returns (and writes) the summary. Safe to call in-process (tests).
    ``check_frozen`` hashes every frozen module before and after (summary["frozen_unchanged"]).
    ``stop_after``: checkpoint and return after this many steps of this invocation (time-limited jobs).
    ``handle_signals``: SIGINT/SIGTERM finish the step, checkpoint and return with "interrupted"
    (the CLI; ``argv`` is its command line, for the --resume hint).
    Raises :class:`TrainingDiverged` after ``train.max_nonfinite`` non-finite steps in a row,
    :class:`DataError` when the data has no usable row, and :class:`CheckpointWriteError` when the
    final (or paused) checkpoint cannot be written."""
    with _deterministic(cfg.train.deterministic), StopRequest(handle_signals, is_main_process()) as stop:
        return _run(cfg, resume, progress, check_frozen, stop_after, stop, argv)


def _run(cfg, resume, progress, check_frozen, stop_after, stop, argv) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object

    t = cfg.train
    init = None
    if t.init_from:  # takes the file's settings into cfg (trainer/init_from.py)
        from . import init_from

        init = init_from.prepare(cfg)
    if not (cfg.base.tiny and not Path(cfg.base.path).exists()):
        check_base(cfg)  # before the engine starts: a wrong path fails in a second, not after model imports
    check_libraries(cfg.base.family)  # a too-old diffusers/transformers: say which version, before any work
    main_proc = is_main_process()
    data_check = check_data(cfg, progress=progress and main_proc)  # every row, before any model loads
    if main_proc:
        print_check(data_check, cfg.base.resolution)
        kind = random_base_kind(cfg.base.path)
        if kind:
            print(random_base_note(cfg.base.path, kind), flush=True)
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --device cpu or auto")
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, cpu=cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    sharded = t.fsdp or t.fsdp_shard_base or accelerator.distributed_type == DistributedType.FSDP
    if sharded:
        ensure_process_group(device)
    group = Group(device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t.mixed_precision]
    output = Path(cfg.output)
    ckpt_root = output / "checkpoints"

    if cfg.base.tiny and not Path(cfg.base.path).exists():
        if accelerator.is_main_process:
            from .tiny_bases import build_tiny_base

            build_tiny_base(cfg.base.family, cfg.base.path, seed=0)
        accelerator.wait_for_everyone()
    adapter = load_family(cfg, device, weight_dtype)
    if t.base_gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    swap = getattr(adapter.denoiser, "hywu_block_swap", None)  # train.blocks_to_swap (trainer/block_swap.py)
    if swap is not None:
        accelerator.print(f"block swap: the last {len(swap.blocks)} blocks of the base ({swap.bytes() / 2**30:.1f} GiB) "
                          "live in CPU memory and are copied in ahead of use")

    digests = {k: module_digest(m) for k, m in adapter.frozen_modules().items()} if check_frozen else None
    train_ds, val_ds = build_datasets(cfg, data_check.train.usable, data_check.val.usable if data_check.val else None)
    train_ds = replay_mix(train_ds, cfg)  # data.replay: old rows in a set share
    chain = Chaining.of(cfg, t.method)  # rows with `edits`: one LoRA per edit, summed (trainer/edits.py)
    rows = None
    if cfg.data.cache_mb > 0:
        cache_file = Path(cfg.data.cache_dir) / f"encoded-{cache_key(cfg, weight_dtype)}.safetensors" if cfg.data.cache_dir else None
        from tqdm.auto import tqdm

        if progress and accelerator.is_main_process and not sys.stderr.isatty():  # no bar frames in a log: one line
            print(f"encoding rows (once: VAE latents + text): {len(train_ds)} rows", file=sys.stderr, flush=True)
        with tqdm(total=len(train_ds), desc="encoding rows (once: VAE latents + text)", unit="row",
                  disable=None if progress and accelerator.is_main_process else True, file=sys.stderr) as ebar:
            rows = EncodedRows(adapter, _Counting(train_ds, ebar), cfg.base.resolution,
                               cfg.data.cache_mb).fill(cache_file, accelerator.is_main_process)
    torch.manual_seed(t.seed)  # same generator init on every process
    if init is not None:  # the file's layers and generator (or the LoRA as the shared rank)
        target_spec = init_from.target_spec(init, adapter.denoiser, cfg)
        method = init_from.build_method(cfg, init, target_spec, adapter.condition_spec, train_ds.tasks)
    else:
        target_spec = build_target_spec(adapter.denoiser, cfg.base.family, include=cfg.base.targets)
        method = build_method(cfg, target_spec, adapter.condition_spec, train_ds.tasks)
    lineage = init.lineage() if init is not None else {}
    if method.name == "hywu" and cfg.generator.condition_norm != "none" and not (init and init.keeps_condition_stats):
        # Every process computes the same statistics from the same first rows (no communication).
        method.module.set_condition_stats(condition_stats(adapter, train_ds, rows, cfg))
    distill = None
    if cfg.data.replay.distill > 0:  # a frozen copy of the file's generator, made before any step or sharding
        if init is None or init.kind != "generator":
            given = f"{init.label} is a LoRA" if init else "no --init-from was given"
            raise ConfigError(f"data.replay.distill needs --init-from a generator file (its LoRAs are the reference); {given}")
        distill = ReplayDistillation(method.module, cfg.data.replay.distill, t.seed).to(device)
    module = method.module.to(device).train()
    if sharded:  # FSDP synchronises through the module itself (trainer/sharding.py)
        shard(module, compute_dtype=weight_dtype if weight_dtype != torch.float32 else None)
        if t.fsdp_shard_base:
            shard(adapter.denoiser)
    if t.freeze_shared_rank:  # extending a generator: new edits go to the request-dependent part only
        for name, p in module.named_parameters():
            if name.startswith(("shared_a.", "shared_b.")):
                p.requires_grad_(False)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    wrapped = module
    if not sharded:  # DDP when several processes; the scheduler is stepped by hand (once per optimizer step)
        wrapped, optimizer = accelerator.prepare(module, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    stream = BatchStream(train_ds, t.batch_size, cfg.base.resolution, t.seed, rank, world,
                         load=rows.load if rows else None, collate_fn=rows.collate if rows else None)

    start, history = 0, {}
    if resume:
        found = latest_checkpoint(ckpt_root)
        if found is not None:
            meta = load_checkpoint(found, module, optimizer, scheduler)
            start, history = int(meta["step"]), meta.get("history") or {}
            if history.get("threads") not in (None, torch.get_num_threads()):
                accelerator.print(f"note: this run uses {torch.get_num_threads()} CPU threads, the checkpoint's run "
                                  f"{history['threads']}; the weights will differ slightly from an uninterrupted run")
            stream.load_state_dict(meta["data"][rank] if rank < len(meta["data"]) else meta["data"][0])
            accelerator.print(f"resumed from {found} (step {start}, written by {meta.get('processes', 1)} process(es))")
        else:
            accelerator.print(f"--resume: no complete checkpoint under {ckpt_root}; starting from step 0")

    with torch.device("meta"):
        lora_parameters = sum(p.numel() for p in method.factory().parameters())  # unsharded count
    sizes = describe(method.module.config, target_spec, adapter.condition_spec) if method.name == "hywu" else {
        "targets": len(target_spec.targets), "lora_parameters": lora_parameters}
    info = {"name": cfg.name, "base_family": cfg.base.family, "base_path": str(cfg.base.path), "method": method.name,
            "resolution": cfg.base.resolution, "config": cfg.to_dict()}
    task_index = {tk: i for i, tk in enumerate(train_ds.tasks)}
    val_items = []
    for i in range(min(len(val_ds), max(cfg.data.n_val, VAL_LOSS_ROWS))):
        try:
            val_items.append(val_ds.load(i, cfg.base.resolution))
        except BadRow:
            pass  # the pre-flight reported it
    if not val_items and len(train_ds):  # no held-out rows: the grid shows training rows (said in the data check)
        val_items = [train_ds.load(i, cfg.base.resolution) for i in range(min(len(train_ds), cfg.data.n_val))]
        val_loss = None
    else:
        val_loss = ValidationLoss(adapter, collate_groups(val_items, task_index, t.batch_size), task_index, accelerator.autocast,
                                  chain=chain)
        accelerator.print(f"validation: the loss on {val_loss.rows} held-out rows ({VAL_DRAWS} fixed noise draws each) with "
                          f"the LoRA and for the base without it, " + (f"every {t.validate_every} steps and " if t.validate_every
                                                                        else "") + "at the end", flush=True)
    val_batch = collate_groups(val_items[:cfg.data.n_val], task_index) if val_items[:cfg.data.n_val] else None
    preview_batch = preview_rows(cfg, task_index)
    val_history: list = [tuple(x) for x in history.get("val", [])]
    loss_history: list = list(history.get("losses", []))
    saved_at = [None]
    if val_loss is not None and history.get("base_val") is not None:
        val_loss.base = history["base_val"]  # resumed: the frozen base's loss is known

    def history_now() -> dict:
        return {"losses": loss_history + losses, "val": val_history, "base_val": val_loss.base if val_loss else None,
                "threads": torch.get_num_threads()}

    def curve():
        if accelerator.is_main_process:
            loss_curve(output / "loss.png", loss_history + losses, val_history, val_loss.base if val_loss else None, cfg.name)

    def plain_method():
        """The method with unsharded weights on the main process (collective when sharded)."""
        if not sharded:
            return method
        full = full_state_dict(module)
        return method.unsharded(full) if full is not None else None

    def save(step: int, must: bool) -> bool:
        """Checkpoint ``step``; a failed write is reported and (unless ``must``) training goes on."""
        states = gather_object([stream.state_dict()]) if world > 1 else [stream.state_dict()]
        extra = {"steps": step, "method": method.name, "base_path": str(cfg.base.path), "name": cfg.name, **adapter.file_extra(),
                 **file_record(cfg), **lineage}
        writer = plain_method()
        err = None
        try:
            if sharded or accelerator.is_main_process:
                save_checkpoint(ckpt_root, step, module, optimizer, scheduler, states,
                                lambda folder: writer.save(folder, cfg.name, extra), info, keep=t.keep_checkpoints,
                                group=group, sharded=sharded, history=history_now())
        except CheckpointWriteError as e:
            err = e
        ok = group.all_true(err is None)  # every process learns that the main one failed
        if ok:
            saved_at[0] = step
            curve()
        if not ok:
            failures.append(step)
            if err is not None and not must:
                print(f"warning: {err}", file=sys.stderr)
        if must and not ok:
            raise err or CheckpointWriteError(f"checkpoint step-{step:08d} could not be written on the main process; "
                                              f"see its log. The previous checkpoint {latest_checkpoint(ckpt_root)} is intact.")
        return ok

    def validate(step: int):
        with parking.on_device():  # the sampler encodes the instructions and decodes its latents
            _validate(step)

    def _validate(step: int):
        if val_loss is not None:  # every process: a sharded generator's forward is collective
            v = val_loss(method, module)
            val_history.append((step, v))
            change = (v - val_loss.base) / val_loss.base * 100 if val_loss.base else 0.0
            msg = f"step {step}: validation loss {v:.4f} (base without LoRA {val_loss.base:.4f}, {change:+.1f}%)"
            bar.write(msg) if accelerator.is_main_process else None
            if tb is not None:
                tb.add_scalar("val/loss", v, step)
                tb.add_scalar("val/base_loss", val_loss.base, step)
            curve()
        grids = [(val_batch, f"step-{step:08d}.png", True), (preview_batch, f"preview-{step:08d}.png", False)]
        for batch, name, with_target in grids:
            if batch is None:
                continue
            if sharded or accelerator.is_main_process:  # a sharded generator needs every process for its forward
                from .validate import validation_grid

                validation_grid(adapter, method, batch, t.validate_steps, str(output / "samples" / name), seed=t.seed,
                                write=accelerator.is_main_process, chain=chain if with_target else None,
                                with_target=with_target)
            accelerator.wait_for_everyone()

    old_stream, old_encoded = None, True
    if distill and cfg.data.replay.distill_rows > 0:  # every row of the replay sources, encoded once
        pool = old_rows(cfg)
        encoded = EncodedRows(adapter, pool, cfg.base.resolution, cfg.data.cache_mb).fill() if cfg.data.cache_mb > 0 else None
        old_encoded = encoded is not None
        old_stream = BatchStream(pool, cfg.data.replay.distill_rows, cfg.base.resolution, t.seed, rank, world,
                                 load=encoded.load if encoded else None, collate_fn=encoded.collate if encoded else None)

    def distill_batch(step: int, micro: int):
        """data.replay.distill_rows old rows for the distillation term alone (the base never sees
        them): drawn per (step, micro-batch, process) from a seeded generator, so resume and any
        process count draw the same rows without state."""
        if old_stream is None:
            return None
        k = cfg.data.replay.distill_rows
        g = torch.Generator().manual_seed(((t.seed * 1_000_003 + step) * 64 + micro) * 4096 + rank)
        batch = old_stream.batch_of(torch.randint(0, len(old_stream.ds), (k,), generator=g).tolist())
        if batch is None:
            return None
        enc = batch["enc"] if "enc" in batch else adapter.encode(batch)
        return adapter.encoded_condition(enc).to(device)

    # every row the steps read is encoded now (training rows, validation rows, replay rows): the encoders can go
    parking = EncoderParking(adapter, device, t.offload_encoders)
    if parking.enabled and rows is not None and old_encoded:
        parking.park()
        accelerator.print(f"the text encoders and the VAE ({parking.bytes() / 2**30:.1f} GiB) wait in CPU memory until "
                          "the validation grids need them (train.offload_encoders)")
    elif parking.enabled:
        accelerator.print("note: the text encoders and the VAE stay on the accelerator: the rows did not fit "
                          "data.cache_mb, so every batch is encoded when drawn (data.cache_dir keeps them on disk instead)")
    tb = _tensorboard(str(output), accelerator.is_main_process)
    if accelerator.is_main_process:
        print(tensorboard_note(tb is not None, str(output / "tensorboard")), flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=t.max_steps, initial=start, disable=None if progress and accelerator.is_main_process else True,
               desc=cfg.name)  # disable=None: no bar frames when stderr is not a terminal
    global_batch, draws = t.batch_size * world, t.draws_per_example
    losses: list[float | None] = []
    step_times: list[float] = []
    step_cpu: list[float] = []
    distill_losses: list[float] = []  # data.replay.distill's term, per micro-batch that had replay rows
    distill_seen = 0  # replay rows the term held in this process (batch rows + distill_rows)
    failures: list[int] = []
    guard = NonFiniteGuard(t.max_nonfinite)
    t0, samples = time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    end = t.max_steps if stop_after is None else min(t.max_steps, start + stop_after)
    n_validations = (t.max_steps // t.validate_every if t.validate_every else 0) + 1
    for step in range(start, end):
        ts, cs = time.perf_counter(), time.process_time()
        step_loss = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            batch = stream.next_batch()
            # One key per (global example slot, draw): noise, timesteps and dropout never depend on the process split.
            keys = [(micro * global_batch + rank * t.batch_size + j) * draws + d for d in range(draws) for j in range(t.batch_size)]
            enc = batch["enc"] if "enc" in batch else adapter.encode(batch)
            prep = adapter.prepare_encoded(enc, step, keys)
            last = micro == t.grad_accum - 1
            if sharded:
                module.set_requires_gradient_sync(last)  # reduce-scatter once per optimizer step
            with (nullcontext() if sharded else accelerator.accumulate(wrapped)), accelerator.autocast():
                plan = chain.plan(batch) if chain else None
                cond = (prep["condition"] if plan is None else plan.condition(adapter, enc)).to(device)
                replay = is_replay(train_ds, batch["row"])
                flags = replay if plan is None else replay[plan.owner]  # per generator condition (one per edit)
                anchor = distill_batch(step, micro) if distill else None
                if anchor is not None:  # one generator call for both (DDP / FSDP see one forward)
                    both = Condition.cat([cond, anchor])
                    lora, s2l = method.lora(wrapped, both, batch["task_id"].to(device), draws)
                    anchors = torch.ones(anchor.batch_size, dtype=torch.bool)
                    replay, flags = torch.cat([replay, anchors]), torch.cat([flags, anchors])
                    kept = distill.loss(lora, both, flags, step)
                    lora = lora.select(slice(0, cond.batch_size))  # the base batch's own LoRAs
                else:
                    lora, s2l = method.lora(wrapped, cond, batch["task_id"].to(device), draws)
                    kept = distill.loss(lora, cond, flags, step) if distill else None
                if plan is not None:  # the distillation term compares each edit's LoRA; the base sees their sum
                    lora = plan.chain(lora)
                # Backward inside the patch: activation checkpointing recomputes the hooked forward.
                with lora_patched(adapter.denoiser, lora, sample_to_lora=s2l):
                    loss = adapter.loss(prep)
                    weights = adapter.loss_weights(prep)
                    loss = (loss if weights is None else loss * weights).mean()
                    if kept is not None:
                        loss = loss + kept
                        distill_losses.append(kept.item())
                        distill_seen += int(replay.sum())
                    if sharded:
                        (loss / t.grad_accum).backward()
                    else:
                        accelerator.backward(loss)
            step_loss += loss.detach() / t.grad_accum
        clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")  # inf: measure only (non-finite check)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if sharded else accelerator.clip_grad_norm_(params, clip))
        loss_value = accelerator.reduce(step_loss, reduction="mean").item() if world > 1 else step_loss.item()
        done = step + 1
        # fp16: an overflowing gradient is the GradScaler's business (it skips the step and lowers the scale)
        problem = guard.check(done, loss_value, _finite_float(grad_norm) if accelerator.scaler is None else 0.0)
        if problem is None:
            optimizer.step()
        else:
            accelerator.print(f"warning: {problem}", file=sys.stderr)
            if tb is not None:
                tb.add_scalar("train/nonfinite_skipped", len(guard.skipped), done)
        optimizer.zero_grad(set_to_none=True)
        if swap is not None:
            swap.finish_step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - ts)
        step_cpu.append(time.process_time() - cs)  # CPU seconds of this process: steadier than wall time on a shared machine
        samples += global_batch * t.grad_accum
        losses.append(loss_value if problem is None else None)
        if guard.should_stop:
            bar.close()
            raise TrainingDiverged(guard.stop_message(done, latest_checkpoint(ckpt_root)))
        if problem is None and (done % t.log_every == 0 or done == t.max_steps):
            rate = samples / max(time.perf_counter() - t0, 1e-9)
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", peak_mb=f"{_peak_memory_mb(device):.0f}")
            if tb is not None:
                tb.add_scalar("train/loss", loss_value, done)
                tb.add_scalar("train/lr", lr, done)
                tb.add_scalar("train/samples_per_s", rate, done)
        bar.update(1)
        if t.save_every and done % t.save_every == 0 and done < t.max_steps:
            if guard.in_a_row:  # keep the last checkpoint a good one until a step succeeds again
                accelerator.print(f"warning: checkpoint at step {done} skipped: the step was not finite", file=sys.stderr)
            else:
                save(done, must=False)
        if t.validate_every and done % t.validate_every == 0 and done < t.max_steps:
            validate(done)
        if len(step_times) == ESTIMATE_AFTER + 1 and done < end and accelerator.is_main_process:
            bar.write(estimate_line(step_times, done - start, end - start, validations=n_validations if val_loss else 0))
        if stop.requested(group if world > 1 else None):
            bar.close()
            if tb is not None:
                tb.close()
            return _interrupted(stop, done, start, saved_at[0] == done or save(done, must=True), ckpt_root, losses,
                                argv, accelerator)
    bar.close()
    elapsed = time.perf_counter() - t0
    if end < t.max_steps:  # paused: checkpoint only; the final files come when the run completes
        if saved_at[0] != end:
            save(end, must=True)
        _end_training(accelerator)
        return {"name": cfg.name, "steps": end, "paused": True, "resumed_from": start, "losses": losses}

    validate(t.max_steps)  # first, so the final checkpoint's history has the last validation loss
    save(t.max_steps, must=True)
    final_files = []
    writer = plain_method()
    if accelerator.is_main_process:
        extra = {"steps": t.max_steps, "method": method.name, "base_path": str(cfg.base.path), "name": cfg.name,
                 **adapter.file_extra(), **file_record(cfg), **lineage}
        final_files = [str(Path(f).resolve()) for f in writer.save(str(output), cfg.name, extra)]
        for f in final_files:
            publish(f)
    skipped = gather_object([dict(stream.skipped)]) if world > 1 else [dict(stream.skipped)]
    total_skipped: dict[str, int] = dict(data_check.train.counts())  # found by the pre-flight, never trained on
    for s in skipped:
        for k, v in s.items():
            total_skipped[k] = total_skipped.get(k, 0) + v
    finite = [x for x in losses if x is not None]
    summary = {
        "name": cfg.name, "method": method.name, "base_family": cfg.base.family, "steps": t.max_steps, "resumed_from": start,
        "processes": world, "global_batch": global_batch * t.grad_accum, "draws_per_example": draws,
        "first_loss": finite[0] if finite else None, "final_loss": finite[-1] if finite else None,
        "mean_loss_last_10": sum(finite[-10:]) / len(finite[-10:]) if finite else None,
        "samples_per_s": samples / elapsed if elapsed > 0 and samples else None, "peak_memory_mb": _peak_memory_mb(device),
        "skipped_rows": total_skipped, "skipped_total": sum(total_skipped.values()),
        "nonfinite_steps_skipped": guard.skipped, "checkpoint_failures": failures, "files": final_files,
        "encoded_rows": rows.summary() if rows else None, "sharded": {"fsdp": sharded, "base": bool(sharded and t.fsdp_shard_base)},
        "init_from": lineage.get("init_from"), "replay_rows": getattr(train_ds, "replay_rows", 0),
        "replay_distill_last": (sum(distill_losses[-20:]) / len(distill_losses[-20:])) if distill_losses else None,
        "replay_distill_rows_seen": distill_seen if distill else None,
        "sizes": sizes, "device": str(device), "mixed_precision": t.mixed_precision, "losses": losses,
        "step_times": step_times, "step_cpu_times": step_cpu, "seconds": time.perf_counter() - t0,
        "validation": {"rows": val_loss.rows if val_loss else 0, "loss": val_history[-1][1] if val_history else None,
                       "base_loss": val_loss.base if val_loss else None, "history": val_history},
        "data_check": data_check.summary(), "deterministic": t.deterministic, "threads": torch.get_num_threads(),
        "loss_curve": str((output / "loss.png").resolve()),
        "samples": str((output / "samples" / f"step-{t.max_steps:08d}.png").resolve()) if val_batch is not None else None,
        "previews": str((output / "samples" / f"preview-{t.max_steps:08d}.png").resolve()) if preview_batch else None,
    }
    if digests is not None:
        after = {k: module_digest(m) for k, m in adapter.frozen_modules().items()}
        summary["frozen_unchanged"] = {k: after[k] == v for k, v in digests.items()}
        summary["frozen_requires_grad"] = any(p.requires_grad for m in adapter.frozen_modules().values() for p in m.parameters())
        summary["frozen_training_mode"] = any(m.training for fm in adapter.frozen_modules().values() for m in fm.modules())
    if accelerator.is_main_process:
        (output / "summary.json").write_text(json.dumps(summary, indent=1))
        publish(output / "summary.json")
        if total_skipped:
            print(f"skipped {summary['skipped_total']} bad data row(s): {total_skipped}", file=sys.stderr)
    if tb is not None:
        tb.close()
    _end_training(accelerator)
    return summary


def main(argv=None) -> int:
    try:
        cfg, args = parse_args(argv)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if args.check_data:
            print_check(check_data(cfg, progress=True, synthetic=True), cfg.base.resolution)
            return 0
        summary = run(cfg, resume=args.resume, check_frozen=args.check_frozen, stop_after=args.stop_after,
                      handle_signals=True, argv=sys.argv[1:] if argv is None else list(argv))
        _close_process_group()
    except (ConfigError, BaseFolderError, FileNotFoundError, LibraryVersionError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if summary is not None and summary.get("interrupted"):
        return EXIT_INTERRUPTED
    if summary is not None and summary.get("paused") and int(os.environ.get("RANK", "0")) == 0:
        print(f"paused after step {summary['steps']} (--stop-after). Continue with: "
              f"{resume_command([a for a in (sys.argv[1:] if argv is None else argv)])}", flush=True)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0 and not summary.get("paused"):
        print("\n".join(summary_lines(summary)), flush=True)
    return 0


def _end_training(accelerator) -> None:
    """accelerate destroys the process group here. gloo's worker thread may still be releasing the
    last collective (an all-gather holding Python tensors needs the GIL for that) while the
    destructor, holding the GIL, joins it: a torchrun process hung there after a complete run.
    A barrier, then a moment without the GIL, lets those releases finish first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
    accelerator.end_training()


def _close_process_group() -> None:
    """Destroy the torch.distributed group before the interpreter exits: left to interpreter
    shutdown, gloo's destructor joins its worker thread while that thread waits for the GIL the
    destructor holds (a torchrun process hung there after a complete run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _interrupted(stop, done, start, saved, ckpt_root, losses, argv, accelerator) -> dict:
    """After a signal: the checkpoint of step ``done`` is written; say how to continue."""
    where = latest_checkpoint(ckpt_root)
    _end_training(accelerator)
    if is_main_process():
        print(f"stopped by {stop.name} after step {done}: checkpoint {where}. Continue with: {resume_command(argv)}",
              flush=True)
    return {"interrupted": True, "signal": stop.name, "steps": done, "resumed_from": start, "checkpoint": str(where),
            "losses": losses}


if __name__ == "__main__":
    sys.exit(main())
