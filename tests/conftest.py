"""Test-suite settings.

The suite runs single-threaded: tests compare numbers, never speed, and the 2-process DDP tests fork the pytest
process (``ddp_fork``), which deadlocks in the child when the parent has already started an OpenMP thread pool.
The variable must be set before torch is first imported, which is why it is set here, at the top.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)
