"""What changes when `accelerate launch` starts several processes: who writes, who waits, what each one uses.

Every process runs the same `run_training`. They train together (Accelerate wraps the model in DDP, FSDP or
DeepSpeed), but only the main process (rank 0) prints and writes the run directory. The others write only a
failure of their own that happened first (see train/run.py).

The rank comes from the launcher's environment (RANK), so the console can be silenced before torch is imported.
"""

from __future__ import annotations

import os

from tunelab.errors import TunelabError


def _from_env(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def process_rank() -> int:
    """This process's rank, as set by `accelerate launch` / torchrun (or MPI); 0 when launched alone."""
    return _from_env(("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"), 0)


def is_main_process() -> bool:
    return process_rank() == 0


def threads_per_process() -> int:
    """Torch threads for this process: OMP_NUM_THREADS when set (it is per process; `accelerate launch` sets
    it), else its share of the cores with the other processes on this machine.

    Each of N processes taking every core oversubscribes the CPU N times over, and every matmul then waits on
    the others. On GPU machines this only sizes the CPU-side work.
    """
    from tunelab.runtime.hardware import usable_cores

    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return usable_cores()
    local = _from_env(("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"), 1)
    return max(1, usable_cores() // local)


def launched_with(kind: str) -> bool:
    """Whether `accelerate launch` was asked for FSDP or DEEPSPEED (it says so in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def join_processes():
    """Accelerate's PartialState: this process's place among the launched ones (joins their process group
    the first time; later calls return the same state).

    Without CUDA the group is a CPU one (gloo), under DeepSpeed too: with cpu=False, Accelerate gives a
    machine without GPUs no process group at all, and each process would train alone.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def accelerator_cpu_flag() -> bool:
    """Accelerator's `cpu=`: without CUDA, tunelab trains on the CPU (Accelerate would otherwise take a Mac's
    MPS), except under DeepSpeed, which cpu=True switches off (DeepSpeed finds the CPU by itself)."""
    import torch

    return not torch.cuda.is_available() and not launched_with("DEEPSPEED")


def on_main_then_share(make):
    """Call make() on the main process only and return its result on every process.

    For what must happen once but be known by all, like creating the run directory (its name holds a
    timestamp that each process would read differently). An error there is raised on every process, so no
    process waits forever for a result that never comes.
    """
    from accelerate.utils import broadcast_object_list

    state = join_processes()
    if state.num_processes == 1:
        return make()
    box: list = [None, None]
    if state.is_main_process:
        try:
            box = [make(), None]
        except Exception as err:  # noqa: BLE001 - re-raised just below, after the others heard of it
            box = [None, f"{err}" if isinstance(err, TunelabError) else f"{type(err).__name__}: {err}"]
            broadcast_object_list(box)
            raise
    broadcast_object_list(box)
    if box[1] is not None:
        raise TunelabError(box[1])
    return box[0]
