"""Weights: every kind of checkpoint in, one kind of answer out.

- :func:`load_source` / :func:`load_gpt` / :func:`source_model_config`: a Hugging Face GPT-2
  folder, a cgpt ``.ckpt`` file, an FSDP or DeepSpeed checkpoint folder, a run folder or a
  LoRA-trained checkpoint (merged) as ``(ModelConfig, state_dict)`` or a built GPT. Every job that
  takes a model (``init_from``, evaluation, generation, conversion, consolidation, LoRA merge, the
  lm-eval adapter) goes through these, so every job accepts the same things.
- :func:`checkpoint_format`, :func:`resume_checkpoint`, :func:`consolidate_checkpoint`: formats.
- :func:`check_resume`, :func:`checkpoint_topology`, :func:`deepspeed_universal`: resuming at
  another world size (a DeepSpeed folder through DeepSpeed's universal checkpoint).
- :func:`atomic_save`, :func:`swap_into_place`: writes that a crash cannot leave half done.

Nothing here knows about distributed strategies: sharded folders are read with
``torch.distributed.checkpoint``'s and DeepSpeed's own offline tools.
"""

from cgpt.weights.atomic import atomic_save, remove_path, swap_into_place, temporary_sibling
from cgpt.weights.formats import (
    LAST,
    checkpoint_format,
    consolidate_checkpoint,
    is_complete_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    resume_checkpoint,
)
from cgpt.weights.loading import load_gpt, load_into, load_source, save_gpt_checkpoint, source_model_config
from cgpt.weights.reshard import (
    ResumeError,
    Topology,
    check_resume,
    checkpoint_topology,
    checkpoint_world_size,
    deepspeed_universal,
    universal_path,
)
from cgpt.weights.state import WeightMismatchError, gpt_state_dict, load_strict

__all__ = [
    "LAST",
    "ResumeError",
    "Topology",
    "WeightMismatchError",
    "atomic_save",
    "check_resume",
    "checkpoint_format",
    "checkpoint_topology",
    "checkpoint_world_size",
    "consolidate_checkpoint",
    "deepspeed_universal",
    "gpt_state_dict",
    "is_complete_checkpoint",
    "load_gpt",
    "load_into",
    "load_source",
    "load_strict",
    "read_checkpoint",
    "remove_path",
    "resolve_checkpoint",
    "resume_checkpoint",
    "save_gpt_checkpoint",
    "source_model_config",
    "swap_into_place",
    "temporary_sibling",
    "universal_path",
]
