"""Build and run a training job from one plain config dict: the library's front door.

The dict is what ``train/pretrain.py`` / ``train/finetune.py`` compose with Hydra and resolve
(``conf/pretrain.yaml``: ``model``, ``data``, ``optim``, ``scheduler``, ``trainer``, ``strategy``,
``callbacks``, ``logger``, ``paths``, ...), so a job runs the same from Python without Hydra::

    from cgpt.training import fit
    summary = fit(config)            # config: a dict as conf/pretrain.yaml composes it

Objects named by ``_target_`` (callbacks, logger) are built by :func:`instantiate`. Importing this
module has no side effects: signals and warning filters are the entry point's (:mod:`cgpt.startup`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cgpt.callbacks import RunSummary
from cgpt.checkpoint import AtomicCheckpointIO, TopologyRecorder
from cgpt.data.mixture import MixturePlan
from cgpt.guard import EXIT_GUARD_STOPPED, StepGuard, build_guard
from cgpt.hardware import (
    accelerator_device_type,
    choose_lm_head,
    explain_compile,
    explain_fused_loss,
    explain_precision,
    precision_dtype,
    resolve_precision,
)
from cgpt.host_memory import resolve_host_malloc
from cgpt.loggers import SampleLogger
from cgpt.preemption import PreemptionHandler
from cgpt.preflight import check_run, check_torchrun, plan_batch
from cgpt.slurm import check_environment
from cgpt.startup import held_signals, mark_distributed_run_done, release_signals
from cgpt.strategies import build_strategy
from cgpt.watchdog import build_watchdog
from cgpt.weights import resume_checkpoint
from cgpt.zero_shot import ZeroShotEval

Components = Callable[[dict[str, Any]], tuple[Any, Any]]


def instantiate(spec: dict[str, Any] | None) -> Any:
    """Call ``spec["_target_"]`` (a dotted path) with the other keys; None for a null target."""
    if not spec or not spec.get("_target_"):
        return None
    module_name, _, attr = spec["_target_"].rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"_target_={spec['_target_']!r} cannot be imported: {e}") from e
    return target(**{k: v for k, v in spec.items() if k != "_target_"})


def model_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The model config: the ``model`` group, or the architecture of ``init_from`` when it is set."""
    if not config.get("init_from"):
        return dict(config["model"])
    from cgpt.weights import source_model_config

    return source_model_config(config["init_from"]).to_dict()


def _module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model_dict(config),
        "optim": config.get("optim") or {},
        "scheduler": config.get("scheduler") or {},
        "compile": config.get("compile", False),
        "lora": config.get("lora") or None,
        "fused_loss": config.get("fused_loss", "auto"),
    }


def _print_tokenizer_notes(source: str, tokenizer: str, vocab_size: int, eos_id: int) -> None:
    from cgpt.init_from import check_tokenizer

    for note in check_tokenizer(source, tokenizer, vocab_size, eos_id):
        print(f"init_from: {note}", flush=True)


def pretrain_components(config: dict[str, Any]) -> tuple[Any, Any]:
    """The module and the packed-shard datamodule of pretraining (and continued pretraining)."""
    from cgpt.data.datamodule import PackedDataModule
    from cgpt.data.stream import DEFAULT_PARTITIONS
    from cgpt.lit_module import CerebrasGPTModule

    module = CerebrasGPTModule(**_module_kwargs(config))
    module.set_init_from(config.get("init_from"))
    d = config["data"]
    train_dir, val_sources, mixture, schedule = training_sources(d)
    one_source = d.get("sources") or ()
    shard_url = d["shard_url"] or (one_source[0].get("shard_url") if len(one_source) == 1 else None)
    datamodule = PackedDataModule(
        data_dir=train_dir, micro_batch_size=d["micro_batch_size"], num_workers=d["num_workers"],
        seed=config["seed"], shard_url=shard_url, val_batches=d["val_batches"], mix_shards=d.get("mix_shards", 4),
        partitions=d.get("partitions", DEFAULT_PARTITIONS),
        val_sources=val_sources, mixture=mixture, schedule=schedule,
    )  # fmt: skip
    datamodule.validate(d["seq_len"], module.model_config.vocab_size, block_size=module.model_config.block_size)
    names = datamodule.val_names
    if datamodule.mixture:  # val/loss: the sources' losses weighted as training draws them at that step
        extra = [0.0] * len(val_sources)
        weights = MixturePlan.from_sources(mixture, 1, schedule).weights_at
        module.set_val_sources(names, lambda step: [*weights(step).tolist(), *extra])
    else:  # val/loss stays the training data's
        module.set_val_sources(names, lambda step: [1.0] + [0.0] * (len(names) - 1))
    if config.get("init_from"):
        m = datamodule.meta
        _print_tokenizer_notes(config["init_from"], m.tokenizer, m.vocab_size, m.eos_id)
    return module, datamodule


def training_sources(data: dict[str, Any]) -> tuple[str, list[tuple[str, str]], list[Any], list[Any]]:
    """From the data config (``dir`` or ``sources`` + ``schedule``, and ``val_sources``): the first
    training folder, the extra ``(name, dir)`` folders to validate on, and the mixture's sources and
    weight changes (a one-source list is ``data.dir``). Checked before training: a
    :class:`~cgpt.config.ConfigError` says what to fix (see :func:`cgpt.data.mixture.parse_mixture`
    and :func:`cgpt.data.mixture.check_source_folders`)."""
    from cgpt.config import ConfigError
    from cgpt.data.mixture import check_source_folders, parse_mixture

    sources, schedule = parse_mixture(data.get("sources"), data.get("schedule"), data.get("dir"))
    if data.get("sources") and data.get("shard_url"):
        raise ConfigError(
            "data.shard_url is for data.dir; with data.sources give each source its own shard_url: "
            "data.sources=[{name: web, dir: ..., weight: ..., shard_url: 'pipe:aws s3 cp s3://bucket/web/{name} -'}]"
        )
    extra = []
    for i, v in enumerate(data.get("val_sources") or ()):
        if not isinstance(v, dict) or not v.get("name") or not v.get("dir"):
            raise ConfigError(f"data.val_sources[{i}] = {v!r}: each entry needs a name and a dir")
        extra.append((str(v["name"]), str(v["dir"])))
    names = [n for n, _ in extra]
    if len(set(names)) < len(names):
        raise ConfigError(f"data.val_sources: duplicate name(s) in {names}; give each folder its own name")
    if data.get("sources"):
        check_source_folders(sources)
    clash = sorted({s.name for s in sources} & set(names)) if len(sources) > 1 else []
    if clash:
        raise ConfigError(f"data.val_sources: {clash} already name data.sources, which are validated anyway")
    if schedule and len(sources) < 2:
        raise ConfigError("data.schedule changes the weights of a mixture: list two or more data.sources")
    return sources[0].dir, extra, sources if len(sources) > 1 else [], schedule


def finetune_components(config: dict[str, Any]) -> tuple[Any, Any]:
    """The SFT module (weights from ``init_from``, optional LoRA) and the JSONL datamodule."""
    from cgpt.config import ConfigError
    from cgpt.data.sft import SFTDataModule
    from cgpt.sft import SFTModule

    module = SFTModule(**_module_kwargs(config))
    module.set_init_from(config.get("init_from"))
    d = config["data"]
    block_size = module.model_config.block_size
    max_seq_len = d["max_seq_len"] or block_size
    if max_seq_len > block_size:
        raise ConfigError(f"data.max_seq_len={max_seq_len} exceeds the model's context of {block_size}")
    datamodule = SFTDataModule(
        train_file=d["train_file"], max_seq_len=max_seq_len, val_file=d["val_file"], val_fraction=d["val_fraction"],
        micro_batch_size=d["micro_batch_size"], pack=d["pack"], on_bad_record=d["on_bad_record"],
        template=d["template"], seed=config["seed"], val_batches=d["val_batches"],
    )  # fmt: skip
    if config.get("init_from"):
        tok = datamodule.tokenizer
        _print_tokenizer_notes(config["init_from"], "gpt2", tok.vocab_size, tok.eos_id)
    out = Path(config["paths"]["output_dir"])
    sft = config["sft"]
    module.set_samples(datamodule.sample_prompts(sft["num_samples"]), sft["max_new_tokens"], out / "samples.jsonl")
    module.set_exports(config.get("export_hf"), out / "adapters.pt")
    module.set_positions_per_row(datamodule.positions_per_row())  # tokens/s and MFU count real rows, not seq_len
    return module, datamodule


def build(
    config: dict[str, Any], components: Components = pretrain_components
) -> tuple[L.Trainer, Any, L.LightningDataModule, RunSummary]:
    """Config dict -> (trainer, module, datamodule, summary writer). Nothing runs yet.

    ``components(config) -> (module, datamodule)`` builds the pair to train (:func:`pretrain_components`,
    :func:`finetune_components`); the datamodule needs ``seq_len`` and ``config["data"]`` the keys
    ``micro_batch_size``/``global_batch_size``.
    """
    L.seed_everything(config["seed"], workers=True, verbose=False)
    module, datamodule = components(config)
    data_cfg = config["data"]
    trainer_cfg = dict(config["trainer"])
    max_steps = trainer_cfg.pop("max_steps") or module.recipe.max_steps
    validate_every = trainer_cfg.pop("validate_every_steps")
    host_malloc = trainer_cfg.pop("host_malloc", "auto")
    plan = plan_batch(
        data_cfg["global_batch_size"] or module.recipe.batch_size, data_cfg["micro_batch_size"],
        trainer_cfg["devices"], trainer_cfg["num_nodes"],
    )  # fmt: skip
    check_environment(trainer_cfg["devices"], trainer_cfg["num_nodes"])  # srun tasks == devices x nodes
    check_torchrun(trainer_cfg["devices"], trainer_cfg["num_nodes"])  # torchrun's processes, likewise
    module.set_runtime(datamodule.seq_len, plan.global_batch_size)
    if hasattr(datamodule, "set_global_batch"):  # the packed order's row width (cgpt/data/stream.py)
        datamodule.set_global_batch(plan.global_batch_size)
    precision_setting = trainer_cfg["precision"]
    trainer_cfg["precision"] = resolve_precision(precision_setting, trainer_cfg["accelerator"])
    fused_setting, head = module.fused_loss, None
    if fused_setting == "auto" and accelerator_device_type(trainer_cfg["accelerator"]) == "cpu":
        # which head is faster depends on the CPU (AVX512_BF16 or not), the dtype and the width
        cfg = module.model_config
        head = choose_lm_head(precision_dtype(trainer_cfg["precision"]), cfg.d_model, cfg.vocab_size)
        module.fused_loss, module.lm_head_chunk, module.lm_head_pad = head.fused, head.chunk, head.pad
    # CPU runs keep freed memory for the next step (cgpt/host_memory.py); applied here, in every rank
    _, malloc_decision = resolve_host_malloc(host_malloc, accelerator_device_type(trainer_cfg["accelerator"]))
    decisions = [
        explain_precision(precision_setting, trainer_cfg["precision"], trainer_cfg["accelerator"]),
        explain_compile(module.compile, trainer_cfg["accelerator"]),
        explain_fused_loss(fused_setting, trainer_cfg["accelerator"], head),
        malloc_decision,
    ]
    if rank_zero_only.rank == 0:  # the run's first lines: what was chosen for this machine, and why
        print("\n".join(decisions), flush=True)
    strategy_cfg = dict(config.get("strategy") or {"name": "auto"})
    check_run(module.model_config, strategy_cfg, trainer_cfg, plan, datamodule.seq_len)  # before any process group
    strategy = build_strategy(strategy_cfg, trainer_cfg["accelerator"], trainer_cfg["devices"],
                              trainer_cfg["num_nodes"], plan.micro_batch_size)  # fmt: skip

    out_dir = Path(config["paths"]["output_dir"])
    resolved = dict(config)
    resolved["resolved"] = {"max_steps": max_steps, "accumulate_grad_batches": plan.accumulate_grad_batches,
                            "global_batch_size": plan.global_batch_size, "seq_len": datamodule.seq_len,
                            "precision": trainer_cfg["precision"], "decisions": decisions}  # fmt: skip
    summary = RunSummary(str(out_dir / "summary.json"), resolved)
    callbacks = [instantiate(c) for c in (config.get("callbacks") or {}).values() if c is not None] + [summary]
    world = trainer_cfg["devices"] * trainer_cfg["num_nodes"]  # the layout each checkpoint records
    callbacks.append(TopologyRecorder(world, plan.micro_batch_size, plan.accumulate_grad_batches))
    # The step guard (cgpt/guard.py) and the hang watchdog (cgpt/watchdog.py): docs/fault-tolerance.md
    guard = build_guard(config.get("guard"), str(out_dir / "checkpoints"))
    watchdog = build_watchdog(config.get("watchdog"), str(out_dir))
    callbacks += [c for c in (guard, watchdog) if c is not None]
    if config.get("preemption"):  # checkpoint + requeue on SIGUSR1/SIGTERM (cgpt/preemption.py)
        callbacks.append(PreemptionHandler(str(out_dir / "checkpoints"), **config["preemption"]))
        for signum in held_signals()[:1]:
            callbacks[-1].handle(signum)
    else:
        release_signals()
    zero_shot = config.get("eval") or {}
    if zero_shot.get("tasks"):  # zero-shot task files scored every N validations (cgpt/zero_shot.py)
        callbacks.append(ZeroShotEval(zero_shot["tasks"], zero_shot.get("every_n_validations", 1),
                                      zero_shot.get("batch_size", 8), zero_shot.get("limit")))  # fmt: skip
    logger = instantiate(config.get("logger")) or False
    sample = config.get("sample")
    if logger and sample and sample.get("prompt"):  # a table of samples at each validation (W&B, TensorBoard)
        callbacks.append(SampleLogger(sample["prompt"], sample["max_new_tokens"], sample["temperature"],
                                      sample["top_k"], seed=config["seed"]))  # fmt: skip
    trainer = L.Trainer(
        **trainer_cfg,
        max_steps=max_steps,
        accumulate_grad_batches=plan.accumulate_grad_batches,
        val_check_interval=validate_every * plan.accumulate_grad_batches,  # counted in micro-batches
        check_val_every_n_epoch=None,
        strategy=strategy,
        plugins=[AtomicCheckpointIO(), *_cluster_plugins()],
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(out_dir),
    )
    for lg in trainer.loggers:  # the whole resolved config (rank 0 only), not just the module's arguments
        lg.log_hyperparams(resolved)
    return trainer, module, datamodule, summary


def _cluster_plugins() -> list[Any]:
    """Under SLURM, Lightning's own requeue handler is off: cgpt.preemption is the one mechanism."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def resume_point(config: dict[str, Any]) -> str | None:
    """The checkpoint this run continues from: ``resume=auto`` -> the output folder's, a path -> it."""
    resume = config.get("resume")
    if resume == "auto":
        found = resume_checkpoint(Path(config["paths"]["output_dir"]) / "checkpoints")
        return str(found) if found else None
    return str(resume) if resume else None


def check_resume_point(ckpt: str, config: dict[str, Any], trainer: L.Trainer, module: Any) -> str | None:
    """Refuse a checkpoint of another model shape or strategy family (:func:`cgpt.weights.check_resume`);
    at another world size, the line that says so and how accumulation follows from the global batch."""
    from cgpt.model import GPT
    from cgpt.strategies import spec_for
    from cgpt.weights import check_resume, checkpoint_topology

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(module.model_config).state_dict().items()}
    check_resume(ckpt, spec_for(config.get("strategy")).kind, shapes)
    saved, world = checkpoint_topology(ckpt), config["trainer"]["devices"] * config["trainer"]["num_nodes"]
    if saved.world_size in (None, world):
        return None
    before = saved.accumulate_grad_batches if saved.accumulate_grad_batches is not None else "?"
    plural = "rank" if world == 1 else "ranks"
    return (f"resuming at {world} {plural} from a checkpoint of {saved.world_size}: "
            f"accumulation {before} -> {trainer.accumulate_grad_batches}")  # fmt: skip


def fit(config: dict[str, Any], components: Components = pretrain_components) -> dict[str, Any]:
    """Train (resuming when the output folder has a checkpoint), validate at the end, write
    summary.json, print the result and a sample. Returns the summary."""
    trainer, module, datamodule, summary = build(config, components)
    ckpt = resume_point(config)
    if ckpt:
        module.set_init_from(None)  # the checkpoint holds the weights (and optimizer, schedule, data position)
        note = check_resume_point(ckpt, config, trainer, module)  # before any process group or weights
    if ckpt and trainer.is_global_zero:
        print(f"resuming from {ckpt}" + (f"\n{note}" if note else ""), flush=True)
    elif module.init_from and trainer.is_global_zero:
        print(f"initialising weights from {module.init_from} (fresh optimizer and schedule)", flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.interrupted:
        raise SystemExit("training was interrupted; re-run the same command to resume")
    preemption = next((c for c in trainer.callbacks if isinstance(c, PreemptionHandler)), None)
    if preemption is not None and preemption.stopped:
        preemption.requeue_or_exit(trainer.is_global_zero)  # checkpoint saved: requeue and exit
    guard = next((c for c in trainer.callbacks if isinstance(c, StepGuard)), None)
    guard_summary = guard.summary() if guard is not None else {"enabled": False}
    if guard is not None and guard.stopped:  # checkpoint saved: record what happened and exit
        summary.write(trainer, module, guard=guard_summary)
        if trainer.is_global_zero:
            print(f"guard: run stopped ({guard.stop_reason}); exit code {EXIT_GUARD_STOPPED}. "
                  f"Events: {summary.path}. Re-running the same command resumes.", flush=True)  # fmt: skip
        _close_process_group()
        raise SystemExit(EXIT_GUARD_STOPPED)
    if trainer.global_step and summary.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    text = _sample(config, module) if trainer.is_global_zero else None
    result = summary.write(trainer, module, sample=text, guard=guard_summary)
    if trainer.is_global_zero:
        entropy = datamodule.meta.extra.get("unigram_entropy") if hasattr(datamodule, "meta") else None
        print(f"\nfinal: step {result['steps']}, train loss {result['train_loss']:.4f}, "
              f"val loss {result['val_loss']:.4f} nats/token"
              + (f" (unigram entropy of the corpus: {entropy:.3f})" if entropy else ""), flush=True)  # fmt: skip
        print(f"summary: {summary.path}", flush=True)
        if text:
            print(f"\nsample:\n{text}\n", flush=True)
    _close_process_group()
    return result


def _close_process_group() -> None:
    """Tear the process group down while the interpreter is intact. Left to exit-time destructors,
    gloo's worker threads can abort the process ("terminate called without an active exception")
    after a run that succeeded. An entry point then skips the interpreter's teardown altogether
    (:func:`cgpt.startup.finish_process`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        mark_distributed_run_done()


def _sample(config: dict[str, Any], module: Any) -> str | None:
    """A text sample from the trained model, for the console and summary.json."""
    sample = config.get("sample")
    if not (sample and sample.get("prompt")) or module.model is None:
        return None
    from cgpt.data.tokenizer import get_tokenizer
    from cgpt.generate import generate

    tok = get_tokenizer()
    idx = torch.tensor([tok.encode(sample["prompt"])], device=module.device)
    g = torch.Generator(device=module.device).manual_seed(config["seed"])
    n = min(sample["max_new_tokens"], module.model_config.block_size - idx.size(1))
    out = generate(module.model, idx, n, temperature=sample["temperature"], top_k=sample["top_k"], generator=g)
    return tok.decode(out[0].tolist())
