"""Build and run a training job from a composed Hydra config (shared by the train/ entry points)."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CGPT_ROOT", str(REPO_ROOT))
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

# SLURM's USR1 (time limit near) during start-up would kill the process: remember it instead, and
# let cgpt.preemption.PreemptionHandler act on it at the first step (see build()).
STARTUP_SIGNALS: list[int] = []
signal.signal(signal.SIGUSR1, lambda signum, _: STARTUP_SIGNALS.append(signum))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cgpt.callbacks import RunSummary  # noqa: E402
from cgpt.checkpoint import AtomicCheckpointIO, resume_checkpoint  # noqa: E402
from cgpt.data.datamodule import PackedDataModule  # noqa: E402
from cgpt.hardware import resolve_precision  # noqa: E402
from cgpt.lit_module import CerebrasGPTModule  # noqa: E402
from cgpt.loggers import SampleLogger  # noqa: E402
from cgpt.preemption import PreemptionHandler  # noqa: E402
from cgpt.preflight import check_run, plan_batch  # noqa: E402
from cgpt.slurm import check_environment  # noqa: E402
from cgpt.strategies import build_strategy  # noqa: E402

TRAINER_EXTRA_KEYS = ("validate_every_steps",)

if "SLURM_JOB_ID" not in os.environ:
    # Lightning hints "srun is available but not used" wherever SLURM is installed; outside a job
    # (a laptop or login node with the SLURM client) that is noise. Inside a job it stays.
    warnings.filterwarnings("ignore", message="The `srun` command is available")


def container(cfg: DictConfig | None) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}


def model_dict(cfg: DictConfig) -> dict[str, Any]:
    """The model config: the ``model`` group, or the architecture of ``init_from`` when it is set."""
    if not cfg.get("init_from"):
        return container(cfg.model)
    from cgpt.init_from import source_model_config

    return source_model_config(cfg.init_from).to_dict()


def pretrain_components(cfg: DictConfig) -> tuple[CerebrasGPTModule, PackedDataModule]:
    """The module and the packed-shard datamodule of pretraining (and continued pretraining)."""
    init_from = cfg.get("init_from")
    module = CerebrasGPTModule(
        model=model_dict(cfg), optim=container(cfg.optim), scheduler=container(cfg.scheduler),
        compile=cfg.compile, lora=container(cfg.get("lora")) or None, fused_loss=cfg.get("fused_loss", "auto"),
    )  # fmt: skip
    module.set_init_from(init_from)
    data_cfg = container(cfg.data)
    datamodule = PackedDataModule(
        data_dir=data_cfg["dir"], micro_batch_size=data_cfg["micro_batch_size"],
        num_workers=data_cfg["num_workers"], seed=cfg.seed, shard_url=data_cfg["shard_url"],
        val_batches=data_cfg["val_batches"], mix_shards=data_cfg.get("mix_shards", 4),
    )  # fmt: skip
    datamodule.validate(data_cfg["seq_len"], module.model_config.vocab_size, block_size=module.model_config.block_size)
    if init_from:
        from cgpt.init_from import check_tokenizer

        m = datamodule.meta
        for note in check_tokenizer(init_from, m.tokenizer, m.vocab_size, m.eos_id):
            print(f"init_from: {note}", flush=True)
    return module, datamodule


def build(
    cfg: DictConfig, components: Callable[[DictConfig], tuple[Any, Any]] = pretrain_components
) -> tuple[L.Trainer, CerebrasGPTModule, L.LightningDataModule, RunSummary]:
    """Compose-time config -> (trainer, module, datamodule, summary writer). Nothing runs yet.

    ``components(cfg) -> (module, datamodule)`` builds the pair to train (train/finetune.py passes its own);
    the datamodule needs ``seq_len`` and ``cfg.data`` the keys ``micro_batch_size``/``global_batch_size``.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = components(cfg)
    data_cfg = container(cfg.data)
    trainer_cfg = container(cfg.trainer)
    max_steps = trainer_cfg.pop("max_steps") or module.recipe.max_steps
    validate_every = trainer_cfg.pop("validate_every_steps")
    plan = plan_batch(
        data_cfg["global_batch_size"] or module.recipe.batch_size, data_cfg["micro_batch_size"],
        trainer_cfg["devices"], trainer_cfg["num_nodes"],
    )  # fmt: skip
    check_environment(trainer_cfg["devices"], trainer_cfg["num_nodes"])  # srun tasks == devices x nodes
    module.set_runtime(datamodule.seq_len, plan.global_batch_size)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg["precision"], trainer_cfg["accelerator"])
    strategy_cfg = container(cfg.strategy)
    check_run(module.model_config, strategy_cfg, trainer_cfg, plan, datamodule.seq_len)  # before any process group
    strategy = build_strategy(strategy_cfg, trainer_cfg["accelerator"], trainer_cfg["devices"],
                              trainer_cfg["num_nodes"], plan.micro_batch_size)  # fmt: skip

    out_dir = Path(cfg.paths.output_dir)
    resolved = container(cfg)
    resolved["resolved"] = {"max_steps": max_steps, "accumulate_grad_batches": plan.accumulate_grad_batches,
                            "global_batch_size": plan.global_batch_size, "seq_len": datamodule.seq_len,
                            "precision": trainer_cfg["precision"]}  # fmt: skip
    summary = RunSummary(str(out_dir / "summary.json"), resolved)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None] + [summary]
    if cfg.get("preemption"):  # checkpoint + requeue on SIGUSR1/SIGTERM (cgpt/preemption.py)
        callbacks.append(PreemptionHandler(str(out_dir / "checkpoints"), **container(cfg.preemption)))
        for signum in STARTUP_SIGNALS[:1]:
            callbacks[-1].handle(signum)
    else:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    logger = instantiate(cfg.logger) if cfg.logger and cfg.logger.get("_target_") else False
    if logger and cfg.sample and cfg.sample.prompt:  # a table of samples at each validation (W&B, TensorBoard)
        s = cfg.sample
        callbacks.append(SampleLogger(s.prompt, s.max_new_tokens, s.temperature, s.top_k, seed=cfg.seed))
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


def fit(cfg: DictConfig, components: Callable[[DictConfig], tuple[Any, Any]] = pretrain_components) -> dict[str, Any]:
    """Train (resuming when the output folder has a checkpoint), validate at the end, write
    summary.json, print the result and a sample. Returns the summary."""
    trainer, module, datamodule, summary = build(cfg, components)
    ckpt = None
    if cfg.resume == "auto":
        ckpt = resume_checkpoint(Path(cfg.paths.output_dir) / "checkpoints")
    elif cfg.resume:
        ckpt = cfg.resume
    if ckpt:
        module.set_init_from(None)  # the checkpoint holds the weights (and optimizer, schedule, data position)
    if ckpt and trainer.is_global_zero:
        print(f"resuming from {ckpt}", flush=True)
    elif module.init_from and trainer.is_global_zero:
        print(f"initialising weights from {module.init_from} (fresh optimizer and schedule)", flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.interrupted:
        raise SystemExit("training was interrupted; re-run the same command to resume")
    preemption = next((c for c in trainer.callbacks if isinstance(c, PreemptionHandler)), None)
    if preemption is not None and preemption.stopped:
        preemption.requeue_or_exit(trainer.is_global_zero)  # checkpoint saved: requeue and exit
    if trainer.global_step and summary.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    sample = _sample(cfg, module) if trainer.is_global_zero else None
    result = summary.write(trainer, module, sample=sample)
    if trainer.is_global_zero:
        entropy = datamodule.meta.extra.get("unigram_entropy") if hasattr(datamodule, "meta") else None
        print(f"\nfinal: step {result['steps']}, train loss {result['train_loss']:.4f}, "
              f"val loss {result['val_loss']:.4f} nats/token"
              + (f" (unigram entropy of the corpus: {entropy:.3f})" if entropy else ""), flush=True)  # fmt: skip
        print(f"summary: {summary.path}", flush=True)
        if sample:
            print(f"\nsample:\n{sample}\n", flush=True)
    _close_process_group()
    return result


def _close_process_group() -> None:
    """Tear the process group down while the interpreter is intact. Left to exit-time destructors,
    gloo's worker threads can abort the process ("terminate called without an active exception")
    after a run that succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _sample(cfg: DictConfig, module: CerebrasGPTModule) -> str | None:
    """A text sample from the trained model, for the console and summary.json."""
    if not (cfg.sample and cfg.sample.prompt) or module.model is None:
        return None
    from cgpt.data.tokenizer import get_tokenizer
    from cgpt.generate import generate

    tok = get_tokenizer()
    idx = torch.tensor([tok.encode(cfg.sample.prompt)], device=module.device)
    g = torch.Generator(device=module.device).manual_seed(cfg.seed)
    n = min(cfg.sample.max_new_tokens, module.model_config.block_size - idx.size(1))
    out = generate(module.model, idx, n, temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, generator=g)
    return tok.decode(out[0].tolist())
