"""Training throughput of cgpt against a minimal plain-PyTorch loop on the same model.

Measures tokens/s, step time, peak memory and MFU (model FLOPs/s over the device's peak: the table
of GPU peaks by name, a measured large matmul on CPUs) for any preset or shape, precision, compile
setting, sequence length and micro-batch. Both loops train the *same* ``GPT`` instance (compiled
once when compile is on) with the same AdamW, schedule, autocast and clipping on the same synthetic
in-memory batches (or, with ``--data``, prepared shards read by the real datamodule), in interleaved
repetitions; the reported ratio (median of per-repetition ratios) is the framework's overhead.

- ``cgpt``: :class:`cgpt.lit_module.CerebrasGPTModule` under a ``lightning.Trainer`` configured as
  ``conf/trainer/default.yaml`` (gradient clipping, logging every 10 steps, the CSV logger and the
  ThroughputMonitor, ProgressPrinter and RunSummary callbacks; no checkpointing, no validation).
- ``plain``: ``for batch in loader: autocast; loss; backward; clip; step; schedule; zero_grad``.

Needs only torch and lightning. Examples::

    python bench/train_throughput.py --model cerebras-gpt-demo --micro-batch 8
    python bench/train_throughput.py --device cuda --model cerebras-gpt-1.3b --seq-len 2048 --micro-batch 8

``--device cuda`` without a GPU prints a ``skipped`` result and exits 0.

``--guard compare`` times the cgpt loop with and without the step guard (``--guard-action rollback``:
the rollback mode, which also keeps each step's micro-batch references); ``--snapshot-cost`` also
times a CPU copy of the weights and AdamW state, what an in-process snapshot for a rollback would
cost per snapshot (docs/design/step-guard.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from cgpt.callbacks import ProgressPrinter, RunSummary, ThroughputMonitor
from cgpt.config import ModelConfig
from cgpt.guard import GuardConfig, StepGuard
from cgpt.hardware import (
    choose_lm_head,
    default_fused_loss,
    gpu_table_peak,
    peak_flops,
    precision_dtype,
    resolve_compile,
    resolve_fused_loss,
    resolve_precision,
)
from cgpt.host_memory import resolve_host_malloc
from cgpt.lit_module import CerebrasGPTModule
from cgpt.optim import build_optimizer, build_scheduler

SHAPE_KEYS = ("n_layer", "d_model", "n_head", "d_ffn", "vocab_size")


class SyntheticBatches(IterableDataset):
    """An endless stream of ``{"tokens": (B, seq_len + 1)}`` batches cycling over a small pool held in memory."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, pool: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randint(0, vocab_size, (pool, micro_batch, seq_len + 1), generator=g)

    def __iter__(self):
        i = 0
        while True:
            yield {"tokens": self.pool[i % len(self.pool)]}
            i += 1


def loader(data: SyntheticBatches, device: torch.device) -> DataLoader:
    """Batches as the datamodule delivers them: pinned on CUDA so the copy can be non-blocking."""
    return DataLoader(data, batch_size=None, num_workers=0, pin_memory=device.type == "cuda")


class Batches:
    """Where both loops get their batches: synthetic in-memory ones, or (``--data``) a fresh
    :class:`cgpt.data.datamodule.PackedDataModule` over prepared shards per loop run, so that both
    loops read the same batches and the real loader's cost is in the figures."""

    def __init__(self, args: argparse.Namespace, vocab_size: int, device: torch.device) -> None:
        self.args, self.device = args, device
        self.synthetic = None
        if not args.data:
            self.synthetic = SyntheticBatches(vocab_size, args.micro_batch, args.seq_len, seed=args.seed)

    def plain_loader(self) -> DataLoader:
        if self.synthetic is not None:
            return loader(self.synthetic, self.device)
        return packed_datamodule(self.args).train_dataloader()

    def fit_kwargs(self) -> dict[str, Any]:
        if self.synthetic is not None:
            return {"train_dataloaders": loader(self.synthetic, self.device)}
        return {"datamodule": packed_datamodule(self.args)}


def packed_datamodule(args: argparse.Namespace) -> Any:
    """The real datamodule (it imports webdataset, so only when ``--data`` is given)."""
    try:
        from cgpt.data.datamodule import PackedDataModule
    except ImportError as e:
        raise SystemExit(f"--data needs the data stack ({e}); install webdataset or drop --data") from e
    return PackedDataModule(args.data, micro_batch_size=args.micro_batch, num_workers=args.num_workers, seed=args.seed)


class StepTimer(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of step ``steps`` (synchronised at both ends only)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0: float | None = None
        self.seconds: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = clock(pl_module.device)
        elif trainer.global_step == self.steps:
            self.seconds = elapsed(self.t0, pl_module.device)


def clock(device: torch.device) -> tuple[float, float]:
    """(wall, this process's CPU time) after the device finished its queued work. CPU time is the
    steadier measure on a shared CPU: it does not count the time other processes hold the cores."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float], device: torch.device) -> tuple[float, float]:
    now = clock(device)
    return now[0] - start[0], now[1] - start[1]


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's max RSS so far (cumulative)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(
    module: CerebrasGPTModule, data: Batches, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """The minimal loop: same model, same AdamW recipe and schedule, autocast, clipping. Returns
    (wall, CPU) seconds of steps ``warmup+1 .. steps``."""
    model = module.model
    model.train()
    lr, eps, warmup_lr, decay = module.resolved_recipe(args.steps)
    optimizer = build_optimizer(model, lr, module.optim_config, eps, module.model_config.width_mult)
    scheduler = build_scheduler(optimizer, warmup_lr, args.steps, decay, module.scheduler_config.final_lr_ratio)
    dtype = precision_dtype(args.precision)
    autocast = args.precision.endswith("-mixed")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and autocast else None
    t0 = start = clock(device)
    for step, batch in enumerate(data.plain_loader(), start=1):
        tokens = batch["tokens"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 and not hasattr(module, "first_step_seconds"):  # compilation happens here
            module.first_step_seconds = elapsed(start, device)
        if step == args.warmup:
            t0 = clock(device)
        if step == args.steps:
            return elapsed(t0, device)
    raise AssertionError("unreachable: the synthetic stream is endless")


NANOGPT_VOCAB_MULTIPLE = 64  # nanoGPT pads GPT-2's 50257 to 50304 "for efficiency"


def build_nanogpt_reference(module: CerebrasGPTModule, device: torch.device) -> torch.nn.Module:
    """The same architecture configured as nanoGPT's ``train.py`` runs it: the vocabulary padded to a
    multiple of 64 (50257 -> 50304) and the full-logits head (``fused_loss`` off)."""
    from cgpt.model import GPT

    cfg = module.model_config
    vocab = -(-cfg.vocab_size // NANOGPT_VOCAB_MULTIPLE) * NANOGPT_VOCAB_MULTIPLE
    ref_cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": vocab, "name": "custom"})
    with torch.device(device):
        model = GPT(ref_cfg)
    model.fused_loss = False
    return model


def run_nanogpt(
    model: torch.nn.Module, data: Batches, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """A reference a reader can trust without nanoGPT at hand: its training step on its CPU path.

    nanoGPT's ``train.py`` on a CPU: no autocast (fp32, whatever the dtype setting), the loss as
    ``F.cross_entropy`` over all logits, AdamW with weight decay 0.1 on >= 2-D parameters and 0 on
    the rest, lr 6e-4, betas (0.9, 0.95), not fused (it fuses on CUDA only), gradient clipping at
    1.0, ``zero_grad(set_to_none=True)``. On CUDA it autocasts like ``--precision``.
    """
    import torch.nn.functional as F

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **extra)
    dtype = precision_dtype(args.precision)
    autocast = device.type == "cuda" and args.precision.endswith("-mixed")
    t0 = clock(device)
    for step, batch in enumerate(data.plain_loader(), start=1):
        tokens = batch["tokens"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == args.warmup:
            t0 = clock(device)
        if step == args.steps:
            return elapsed(t0, device)
    raise AssertionError("unreachable: the synthetic stream is endless")


def run_cgpt(
    module: CerebrasGPTModule, data: Batches, args: argparse.Namespace, device: torch.device, guard: bool = False
) -> tuple[float, float]:
    """cgpt's training path: the LightningModule under a Trainer set up like cgpt.training.build
    (with ``guard``, plus the step guard of conf/guard/default.yaml)."""
    timer = StepTimer(args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="cgpt-bench-") as tmp:
        guards = [StepGuard(GuardConfig(action=args.guard_action), tmp)] if guard else []
        logger = L.pytorch.loggers.CSVLogger(tmp, name="csv") if args.logger == "csv" else False
        trainer = L.Trainer(
            accelerator=device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=args.precision,
            max_steps=args.steps,
            gradient_clip_val=args.clip,
            gradient_clip_algorithm="norm",
            log_every_n_steps=args.log_every,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=logger,
            callbacks=[
                ThroughputMonitor(args.log_every, args.peak_flops),
                ProgressPrinter(50, stream="stderr"),  # stdout carries the results
                RunSummary(str(Path(tmp) / "summary.json")),  # cgpt.training adds it; write() is not called here
                timer,
                *guards,
            ],
            default_root_dir=tmp,
        )
        trainer.fit(module, **data.fit_kwargs())
        module.throughput_logged = trainer.callback_metrics.get("mfu")
        module._trainer = None  # let the trainer (and its AdamW state) go before the next loop runs
        del trainer
    return timer.seconds


def run_cgpt_guarded(
    module: CerebrasGPTModule, data: Batches, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    return run_cgpt(module, data, args, device, guard=True)


def _head_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(d_model, vocab) of the benchmarked model, before it is built."""
    overrides = {k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None}
    if args.model not in ("custom", None):
        cfg = ModelConfig.from_name(args.model, **overrides)
    else:
        cfg = ModelConfig(**{"n_layer": 1, "n_head": 1, **overrides})
    return cfg.d_model, cfg.vocab_size


def build_module(args: argparse.Namespace, device: torch.device) -> CerebrasGPTModule:
    overrides = {k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None}
    model = {"name": args.model, **overrides}
    if args.model not in ("custom", None):
        model = ModelConfig.from_name(args.model, **overrides).to_dict()
    model["block_size"] = max(model.get("block_size") or args.seq_len, args.seq_len)
    torch.manual_seed(args.seed)
    module = CerebrasGPTModule(model=model, compile=args.compile, fused_loss=args.fused_loss)
    module.set_runtime(args.seq_len, args.micro_batch)
    module.lm_head_chunk = getattr(args, "head_chunk", None)
    module.lm_head_pad = getattr(args, "head_pad", None)
    with torch.device(device):
        module.configure_model()  # built (and compiled) once; both loops train this same GPT
    return module


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark both loops; returns the result dict (also printed and written to ``--json``)."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return {"skipped": "CUDA is not available on this machine", "device": args.device}
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device.type)
    if not (args.precision.endswith("-mixed") or args.precision == "32-true"):
        raise SystemExit(f"--precision {args.precision}: use bf16-mixed, 16-mixed, 32-true or auto")
    args.compile = resolve_compile(args.compile, device)
    args.fused_loss = resolve_fused_loss(args.fused_loss)
    args.head_chunk = args.head_pad = None
    if args.fused_loss == "auto" and device.type == "cpu":  # what a cgpt run decides on this CPU
        head = choose_lm_head(precision_dtype(args.precision), *_head_shape(args))
        args.fused_loss, args.head_chunk, args.head_pad = head.fused, head.chunk, head.pad
        print(f"fused LM-head loss {head.describe()}", file=sys.stderr, flush=True)
    elif args.fused_loss == "auto":
        args.fused_loss = default_fused_loss(device)
    # The C allocator as a cgpt run on this device sets it (cgpt/host_memory.py), for every loop alike.
    args.host_malloc_kept, line = resolve_host_malloc(args.host_malloc, device.type)
    print(line, file=sys.stderr, flush=True)
    if args.warmup < 1 or args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}), and --warmup must be >= 1")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.data:  # the prepared shards fix the sequence length
        dm = packed_datamodule(args)
        args.seq_len = dm.seq_len
    module = build_module(args, device)
    if args.data:
        dm.validate(args.seq_len, module.model_config.vocab_size)
    config = module.model_config
    data = Batches(args, config.vocab_size, device)
    dtype = precision_dtype(args.precision)
    if args.peak_flops is None:
        args.peak_flops = peak_flops(device, dtype)
    flops_per_token = config.flops_per_token(args.seq_len)
    tokens = (args.steps - args.warmup) * args.micro_batch * args.seq_len

    loops: dict[str, tuple[Any, Any]] = {"plain": (run_plain, module), "cgpt": (run_cgpt, module)}
    if args.reference == "nanogpt":  # nanoGPT's CPU training step on the same shape (own weights)
        loops["nanogpt"] = (run_nanogpt, build_nanogpt_reference(module, device))
    if args.guard == "on":  # the cgpt loop as runs are configured by default: with the step guard
        loops["cgpt"] = (run_cgpt_guarded, module)
    elif args.guard == "compare":  # both, interleaved: the guard's cost
        loops["cgpt_guard"] = (run_cgpt_guarded, module)
    if args.compare_eager:  # the plain loop on an uncompiled twin (same init): what compile buys
        loops["eager"] = (run_plain, build_module(argparse.Namespace(**{**vars(args), "compile": False}), device))
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in loops}
    memory: dict[str, float] = {}
    for rep in range(args.repeats):
        order = list(loops) if rep % 2 == 0 else list(reversed(loops))  # cancel drift
        for name in order:
            reset_peak_memory(device)
            fn, mod = loops[name]
            wall, cpu = fn(mod, data, args, device)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
            memory[name] = max(memory.get(name, 0.0), peak_memory_mb(device))
            print(f"rep {rep} {name}: {tokens / seconds[name][-1]:,.0f} tok/s", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "model": config.name,
        "shape": {k: getattr(config, k) for k in SHAPE_KEYS},
        "num_params": config.num_params(),
        "device": device_name(device),
        "precision": args.precision,
        "compile": args.compile,
        "fused_loss": args.fused_loss,
        "host_malloc_kept": args.host_malloc_kept,
        "seq_len": args.seq_len,
        "data": args.data or "synthetic",
        "micro_batch": args.micro_batch,
        "timed_steps": args.steps - args.warmup,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "flops_per_token": flops_per_token,
        "peak_flops": args.peak_flops,
        "peak_source": "table" if device.type == "cuda" and gpu_table_peak(device_name(device)) else "measured matmul",
    }
    for name in loops:
        secs = statistics.median(seconds[name])
        result[name] = {
            "tokens_per_sec": tokens / secs,
            "step_time_ms": 1000 * secs / (args.steps - args.warmup),
            "cpu_time_per_step_ms": 1000 * statistics.median(cpu_seconds[name]) / (args.steps - args.warmup),
            "mfu": tokens / secs * flops_per_token / args.peak_flops,
            "peak_memory_mb": memory[name],
            "tokens_per_sec_reps": [tokens / s for s in seconds[name]],
        }
    if "nanogpt" in loops:
        result["nanogpt"]["vocab_size"] = loops["nanogpt"][1].config.vocab_size
        result["nanogpt"]["fp32_on_cpu"] = device.type == "cpu"
        speedups = [r / c for r, c in zip(seconds["nanogpt"], seconds["cgpt"])]
        result["ratio_cgpt_over_nanogpt"] = statistics.median(speedups)
        result["ratio_nanogpt_reps"] = speedups
        if device.type == "cpu":
            cpu = [r / c for r, c in zip(cpu_seconds["nanogpt"], cpu_seconds["cgpt"])]
            result["ratio_nanogpt_cpu_time"] = statistics.median(cpu)
    ratios = [p / c for p, c in zip(seconds["plain"], seconds["cgpt"])]
    result["ratio_cgpt_over_plain"] = statistics.median(ratios)
    result["ratio_reps"] = ratios
    if device.type == "cpu":  # the same ratio in process CPU time: robust to other load on the machine
        cpu_ratios = [p / c for p, c in zip(cpu_seconds["plain"], cpu_seconds["cgpt"])]
        result["ratio_cpu_time"] = statistics.median(cpu_ratios)
        result["ratio_cpu_time_reps"] = cpu_ratios
    result["guard"] = args.guard
    if "cgpt_guard" in loops:  # > 1: the guard slows a step down by that factor
        result["guard_cost"] = statistics.median(g / c for g, c in zip(seconds["cgpt_guard"], seconds["cgpt"]))
        result["guard_cost_reps"] = [g / c for g, c in zip(seconds["cgpt_guard"], seconds["cgpt"])]
        if device.type == "cpu":
            result["guard_cost_cpu_time"] = statistics.median(
                g / c for g, c in zip(cpu_seconds["cgpt_guard"], cpu_seconds["cgpt"])
            )
    if "eager" in loops:
        result["compile_speedup"] = statistics.median(e / p for e, p in zip(seconds["eager"], seconds["plain"]))
        result["compile_speedup_cpu_time"] = statistics.median(
            e / p for e, p in zip(cpu_seconds["eager"], cpu_seconds["plain"])
        )
    for name in ("plain", "eager"):  # the very first step of the plain loop: compilation when on
        if name in loops and hasattr(loops[name][1], "first_step_seconds"):
            result[name]["first_step_s"], result[name]["first_step_cpu_s"] = loops[name][1].first_step_seconds
    logged = getattr(module, "throughput_logged", None)
    result["cgpt"]["mfu_logged_by_callback"] = float(logged) if logged is not None else None
    if args.snapshot_cost:
        result["snapshot"] = snapshot_cost(module.model, args.repeats)
    return result


def snapshot_cost(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Wall and CPU time of copying the weights and a full AdamW state (two moments) to fresh CPU
    tensors: the price of one in-process snapshot. Median over ``repeats``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments
    optimizer.zero_grad(set_to_none=True)
    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    walls, cpus = [], []
    for _ in range(max(repeats, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        copies = [t.to("cpu", copy=True) for t in tensors]
        if tensors[0].is_cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del copies
    return {"bytes": float(sum(t.numel() * t.element_size() for t in tensors)),
            "wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus)}  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def report(result: dict[str, Any]) -> str:
    """A human summary of :func:`run`'s result."""
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    lines = [
        f"{result['model']} {result['num_params'] / 1e6:.1f}M params on {result['device']}, {result['precision']}, "
        f"compile={result['compile']}, fused loss={result['fused_loss']}, "
        f"host malloc {'kept' if result['host_malloc_kept'] else 'default'}, "
        f"seq {result['seq_len']} x micro-batch {result['micro_batch']}, "
        f"{result['timed_steps']} timed steps x {result['repeats']} reps, peak {result['peak_flops'] / 1e12:.2f} "
        f"TFLOP/s ({result['peak_source']})",
    ]
    for name in ("plain", "cgpt", "cgpt_guard", "eager", "nanogpt"):
        if name not in result:
            continue
        r = result[name]
        lines.append(
            f"  {name:10s}: {r['tokens_per_sec']:>12,.0f} tok/s  {r['step_time_ms']:9.2f} ms/step  "
            f"MFU {100 * r['mfu']:6.2f}%  peak mem {r['peak_memory_mb']:,.0f} MiB"
        )
    if "compile_speedup" in result:
        lines.append(
            f"  compiled / eager plain loop: {result['compile_speedup']:.3f} (CPU time "
            f"{result.get('compile_speedup_cpu_time', float('nan')):.3f}); first step compiled "
            f"{result['plain']['first_step_s']:.1f} s, eager {result['eager']['first_step_s']:.1f} s"
        )
    if "snapshot" in result:
        snap = result["snapshot"]
        lines.append(f"  snapshot of weights + AdamW state to CPU: {snap['bytes'] / 2**20:,.0f} MiB in "
                     f"{snap['wall_ms']:.1f} ms wall, {snap['cpu_ms']:.1f} ms CPU")  # fmt: skip
    if "guard_cost" in result:
        reps = ", ".join(f"{r:.3f}" for r in result["guard_cost_reps"])
        lines.append(f"  step time with / without the guard: {result['guard_cost']:.3f} (median of {reps}); "
                     f"CPU time {result.get('guard_cost_cpu_time', float('nan')):.3f}")  # fmt: skip
    if "ratio_cgpt_over_nanogpt" in result:
        reps = ", ".join(f"{r:.3f}" for r in result["ratio_nanogpt_reps"])
        fp32 = "fp32, " if result["nanogpt"]["fp32_on_cpu"] else ""
        lines.append(
            f"  cgpt / nanoGPT-configured loop ({fp32}vocab {result['nanogpt']['vocab_size']}, full logits): "
            f"{result['ratio_cgpt_over_nanogpt']:.3f} (median of {reps})"
            + (f"; in CPU time {result['ratio_nanogpt_cpu_time']:.3f}" if "ratio_nanogpt_cpu_time" in result else "")
        )
    reps = ", ".join(f"{r:.3f}" for r in result["ratio_reps"])
    lines.append(f"  cgpt / plain throughput: {result['ratio_cgpt_over_plain']:.3f} (median of {reps})")
    if "ratio_cpu_time" in result:
        reps = ", ".join(f"{r:.3f}" for r in result["ratio_cpu_time_reps"])
        lines.append(f"  same in process CPU time: {result['ratio_cpu_time']:.3f} (median of {reps})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cerebras-gpt-demo", help="preset name, or 'custom' with the shape flags")
    for key in SHAPE_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None, help=f"override {key}")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (with --data: the shards')")
    p.add_argument("--data", default=None, help="prepared data folder: read it with the real datamodule")
    p.add_argument("--num-workers", type=int, default=0, help="dataloader workers with --data")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    p.add_argument("--precision", default="auto", help="auto | bf16-mixed | 16-mixed | 32-true")
    p.add_argument("--compile", default="auto", help="auto (on for CUDA, off on CPU) | true | false")
    p.add_argument("--fused-loss", default="auto", help="auto (on for CPU, off for CUDA) | true | false")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--host-malloc", default="auto", help="auto (kept on CPU, as cgpt runs) | keep | default")
    p.add_argument("--steps", type=int, default=30, help="steps per loop and repetition, warmup included")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of both loops")
    p.add_argument("--compare-eager", action="store_true", help="also time the plain loop uncompiled (with --compile)")
    p.add_argument(
        "--reference",
        choices=("nanogpt", "none"),
        default="nanogpt",
        help="also time nanoGPT's CPU training step on the same shape (fp32 on CPU, vocab padded to 50304)",
    )
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--log-every", type=int, default=10, help="Lightning log_every_n_steps")
    p.add_argument("--guard", choices=("off", "on", "compare"), default="off",
                   help="the step guard in the cgpt loop: off, on, or compare (both loops, interleaved)")  # fmt: skip
    p.add_argument(
        "--guard-action",
        choices=("skip", "rollback"),
        default="skip",
        help="the guard's action in the guarded loop (rollback also keeps each step's micro-batches)",
    )
    p.add_argument("--snapshot-cost", action="store_true",
                   help="also time a CPU copy of weights + AdamW state (one in-process rollback snapshot)")  # fmt: skip
    p.add_argument("--logger", choices=("csv", "none"), default="csv", help="cgpt path logger")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device peak FLOP/s")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    result = run(args)
    print(report(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
