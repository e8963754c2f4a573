"""torchrun-native distributed helpers.

Launch with torchrun; RANK / LOCAL_RANK / WORLD_SIZE come from the environment. A plain
`python -m ...` run is a single process and needs no process group. NCCL on GPUs, gloo on CPU.
`python -m utils.dist ARGS` is torchrun with the same ARGS and a one-line failure report (used by
run_train.sh and, through tools/launch.sh, by the run_evaluate_*.sh scripts).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from utils.errors import EXIT_PEER_FAILED, EXIT_USER_ERROR, UserError, first_line, is_user_error


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class GroupError(UserError, RuntimeError):
    """A user error that a rank found, raised on every rank of the group (`group_errors`) so
    that all stop together; rank 0 alone prints it (one line)."""
    all_ranks = True


class DeviceError(UserError, RuntimeError):
    """A device request this machine cannot satisfy (one-line message)."""


def resolve_device(device: str, local_rank: int) -> torch.device:
    """`device`: "auto" (CUDA when visible, else CPU), "cpu" or "cuda"."""
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise DeviceError("device=cuda was asked for but no GPU is visible (use gpu_device=cpu)")
    if local_rank >= n:
        raise DeviceError(
            f"process with LOCAL_RANK={local_rank} has no GPU: only {n} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); lower gpu_number")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_min: int = 30) -> DistInfo:
    """Read the torchrun environment, pick the device and start the process group if needed."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_min)
        # torchrun's static rendezvous keeps one store across elastic restarts, so a restarted
        # group could read the dead workers' addresses from it ("Connection refused"): give
        # every attempt its own key prefix.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        kwargs = dict(backend=backend, timeout=timeout, rank=rank, world_size=world_size,
                      store=dist.PrefixStore(f"more/attempt_{attempt}", store))
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank, local_rank, world_size, dev)


def rank_shard(n: int, dist: DistInfo) -> range:
    """The indices of n items this rank takes (rank::world_size): evaluation and validation
    shard their images so; the ranks' confusion matrices are then summed (`all_reduce_sum`)."""
    return range(dist.rank, n, dist.world_size)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process). Returns the tensor."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (returns it unchanged in one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def first_error(message: str | None) -> str | None:
    """Each rank's error message (None: it found none) -> the lowest failing rank's message, on
    every rank (None when no rank failed). A collective: every rank calls it."""
    if not is_initialized():
        return message
    box: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(box, message)
    return next((m for m in box if m is not None), None)


@contextmanager
def group_errors() -> Iterator[None]:
    """Checks that stop every rank together: a user error raised in the block on any rank is
    raised on every rank as GroupError with the lowest failing rank's line (printed by rank 0
    alone). A collective: every rank runs the block. In one process the error goes on as it is."""
    err = None
    try:
        yield
    except Exception as exc:
        if not is_initialized() or not is_user_error(exc):
            raise
        err = first_line(exc)
    err = first_error(err)
    if err is not None:
        raise GroupError(err)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def peer_failed(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process of the group died."""
    if not is_initialized():
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer",
                            "remote worker crashing", "NCCL communicator was aborted"))


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def _signal_name(code: int) -> str:
    import signal
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class _QuietElastic:
    """logging filter for torchrun's agent: drop the lines `launch` replaces or that add nothing
    to a worker's own message; let the restart notice (INFO) through."""

    DROP = ("failed (exitcode", "Sending process")

    def filter(self, record) -> bool:
        msg = str(record.msg)
        if "will restart worker group" in msg:
            return True
        return record.levelno >= 30 and not msg.startswith(self.DROP)


def launch(argv: list[str]) -> int:
    """torchrun (same arguments) with a short failure report; returns the exit code.

    A worker that exits with code 2 has printed one `error: ...` line (a bad input, a non-finite
    loss), or left it to rank 0; torchrun's own report (a traceback and a 20-line failure
    summary) would bury it, so it is left out, and replaced by one line for other failures.
    Elastic restarts (`--max-restarts`) behave exactly as with torchrun, with a one-line notice.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.api"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addFilter(_QuietElastic())
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        failures = exc.failures
        if any(f.exitcode == EXIT_USER_ERROR for f in failures.values()):
            return EXIT_USER_ERROR  # a worker said why in one line (utils.errors.user_errors)
        # The root cause: not a rank that stopped because a peer died or that torchrun
        # terminated (SIGTERM); then the earliest.
        rank = min(failures, key=lambda r: (failures[r].exitcode in (EXIT_PEER_FAILED, -15),
                                            failures[r].timestamp, r))
        code = failures[rank].exitcode
        how = f"was killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
        hint = " (a SIGKILL with no message above is often the out-of-memory killer)" if code == -9 else ""
        print(f"error: process rank {rank} {how}; see its output above{hint}",
              file=sys.stderr)
        return 128 - code if code < 0 else code
    return 0


if __name__ == "__main__":  # python -m utils.dist [torchrun arguments] -m module [args]
    sys.exit(launch(sys.argv[1:]))
