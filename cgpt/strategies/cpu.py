"""The CPU path: FSDP2 and DeepSpeed on a CPU accelerator with gloo (tests, CI, debugging).

Lightning refuses DeepSpeed on a CPU accelerator, although DeepSpeed's CPU accelerator runs ZeRO
1/2/3 over gloo. The subclasses here lift that check and supply what DeepSpeed expects from a
device: indexed CPU devices (``cpu:0``, ``cpu:1``: DeepSpeed checks device index == local rank)
and the torch.distributed environment variables. FSDP2 (``fully_shard``) runs on CPU as it is;
its subclass only pins gloo. :func:`cgpt.strategies.build_strategy` picks these for ``accelerator=cpu``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy

from cgpt.strategies.deepspeed import CgptDeepSpeedStrategy
from cgpt.strategies.fsdp import FSDP2Strategy


class CPUFSDP2Strategy(FSDP2Strategy):
    """FSDP2 over gloo on CPU processes."""

    strategy_name = "cgpt_fsdp_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["process_group_backend"] = kwargs.get("process_group_backend") or "gloo"
        super().__init__(*args, **kwargs)


class CPUDeepSpeedStrategy(CgptDeepSpeedStrategy):
    """DeepSpeed ZeRO 1/2/3 (and offload, with DeepSpeedCPUAdam) over gloo on CPU processes."""

    strategy_name = "cgpt_deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["process_group_backend"] = kwargs.get("process_group_backend") or "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(*args, **kwargs)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        # Indexed devices: DeepSpeed validates that device index == local rank.
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices or [None]))]
        for key, value in (("MASTER_ADDR", self.cluster_environment.main_address),
                           ("MASTER_PORT", str(self.cluster_environment.main_port)),
                           ("LOCAL_RANK", str(self.local_rank))):  # fmt: skip
            os.environ.setdefault(key, value)
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check
