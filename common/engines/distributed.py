"""Data-parallel training with PyTorch DDP, launched by ``torchrun``: the glue a ``multi_gpu_train.json`` needs.

One process per GPU (or per CPU process with Gloo): every process holds the whole network, sees its own shard of
the training set (``monai.data.DistributedSampler``) and DDP averages the parameters' gradients at each step, so
the replicas stay equal. The rest of the run follows three rules, so that every process takes the same decisions:

- every process validates on the whole validation set with equal networks (their batch-norm buffers averaged
  first, :func:`average_buffers`), so early stopping and the best-model choice agree without any message passing;
- only the main process (rank 0) logs, writes TensorBoard and shows progress (:func:`main_process_handlers`);
  ignite's ``Checkpoint`` already saves on rank 0 only and stores ``network.module`` (no ``module.`` prefix), so a
  checkpoint from a multi-GPU run loads in the single-process configs;
- work with side effects on shared disk (generating the synthetic data set) runs on rank 0 first
  (:func:`main_process_first`).

Backend NCCL on CUDA, Gloo on the CPU. The attribution constraint's double backprop goes through DDP: the input
gradient is taken with ``torch.autograd.grad`` (no parameter hooks fire) and the one ``loss.backward()``
all-reduces the parameters' gradients, second-order terms included (tests/test_multi_gpu.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from common.errors import InputError

LAUNCH_HINT = (
    "expected a launch by torchrun --nproc_per_node=N ..., e.g. torchrun --nproc_per_node=2 -m monai.bundle run "
    "--config_file \"['bundles/NAME/configs/train.json','bundles/NAME/configs/multi_gpu_train.json']\""
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def process_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_process_group() -> str:
    """Join the process group that ``torchrun`` set up (NCCL on CUDA, Gloo on the CPU); returns the backend."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InputError(f"multi_gpu_train.json: environment variables {', '.join(missing)} are not set; {LAUNCH_HINT}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not is_distributed():
        if backend == "nccl":
            torch.cuda.set_device(process_device())
        dist.init_process_group(backend=backend)
    return dist.get_backend()


def destroy_process_group() -> None:
    if is_distributed():
        dist.barrier()  # nobody leaves while another process still writes (rank 0's last checkpoint)
        dist.destroy_process_group()


def data_parallel(network: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``network`` on ``device`` wrapped in DDP (parameters and buffers broadcast from rank 0 at construction)."""
    network = network.to(device)
    ids = [device] if torch.device(device).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, output_device=device if ids else None)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (for work one process does alone: a DDP forward there would wait for the
    others), or ``network`` itself."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def main_process_first(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0, then on the others (which then find its files, e.g. a generated data set)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    result = fn(*args, **kwargs) if is_main_process() else None
    dist.barrier()
    return result if is_main_process() else fn(*args, **kwargs)


def main_process_value(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only, its (picklable) result sent to every process: for a quantity measured
    on the data that every process must share (the latent scale factor of a diffusion training, which each process
    would otherwise measure on its own shard, and write to the same file)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    box = [fn(*args, **kwargs) if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _logging_handler_types() -> tuple[type, ...]:
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler, TensorBoardImageHandler, TensorBoardStatsHandler

    from common.handlers import TensorBoardAttributionMaps, TensorBoardOutputImages

    return (
        ProgressBar,
        StatsHandler,
        TensorBoardStatsHandler,
        TensorBoardImageHandler,
        TensorBoardAttributionMaps,
        TensorBoardOutputImages,
    )


def main_process_handlers(handlers: Sequence) -> list:
    """``handlers`` on rank 0; on the other ranks without the ones that only log (console, TensorBoard, progress)."""
    if is_main_process():
        return list(handlers)
    skip = _logging_handler_types()
    return [h for h in handlers if not isinstance(h, skip)]


def average_buffers(network: torch.nn.Module) -> None:
    """Average the floating-point buffers (batch-norm running statistics) of ``network`` over the processes.

    Each process's buffers follow its own data shard, so equal parameters do not yet make equal networks; after
    this they are, and validation gives every process the same score. Integer buffers (``num_batches_tracked``)
    are equal already. No-op in a single process."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buffer in unwrap(network).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
