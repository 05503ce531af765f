"""The one place an optimizer wraps the model: AdamW, warmup + linear decay, grad clipping.

Two engines with one interface, `Engine`, so the training loop never knows which it drives.
`TorchEngine` is the single-process path; `DeepSpeedEngine` wraps the same model and optimizer
in `deepspeed.initialize` (data parallel, ZeRO, bf16) for the cluster's trainers. Neither
pickles: checkpoints load with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

import torch

from core.errors import InputError


class Engine(Protocol):
    """What the training loop drives."""

    module: torch.nn.Module  # the plain model, for saving and for the index refresh

    def __call__(self, *args, **kwargs) -> dict:
        """The model's forward."""

    def step(self, loss: torch.Tensor) -> float | None:
        """Backward, clip, update, schedule; the gradient norm before clipping (None where unknown)."""

    def save(self, directory: Path, client_state: dict) -> None:
        """This rank's training state (model, optimizer, scheduler, `client_state`) into `directory`."""

    def load(self, directory: Path) -> dict:
        """Restore the state `save` wrote; returns its client state."""


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def lr_lambdas(param_groups: list[dict], total_steps: int, warmup_steps: int) -> list:
    """Per group: warmup + linear decay to the last step. A group frozen for its `frozen_steps` first steps
    starts its warmup when it thaws (on the run's clock it would thaw mid-decay: frozen 100 of 140 steps, the
    retriever would train at a third of its lr and falling)."""
    def schedule(frozen: int):
        return lambda s: 0.0 if s < frozen else linear_warmup_decay(s - frozen, warmup_steps, total_steps - frozen)
    return [schedule(g.get("frozen_steps", 0)) for g in param_groups]


def _optimizer(param_groups: list[dict], total_steps: int, warmup_steps: int, fused: bool = False):
    groups = [{k: v for k, v in g.items() if k != "frozen_steps"} for g in param_groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(param_groups, total_steps, warmup_steps))
    return optimizer, scheduler


class TorchEngine:
    def __init__(self, param_groups: list[dict], total_steps: int, warmup_steps: int, grad_clip: float = 1.0,
                 model: torch.nn.Module | None = None):
        self.params = [p for g in param_groups for p in g["params"]]
        # One fused kernel per step on CUDA instead of a dozen foreach passes over every parameter.
        fused = bool(self.params) and all(p.is_cuda for p in self.params)
        self.optimizer, self.scheduler = _optimizer(param_groups, total_steps, warmup_steps, fused)
        self.grad_clip = grad_clip
        self.module = model

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, update; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else torch.tensor(0.)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path, client_state: dict) -> None:
        torch.save({"model": self.module.state_dict(), **self.state_dict(), "client": client_state},
                   Path(directory) / "engine.pt")

    def load(self, directory: Path) -> dict:
        path = Path(directory) / "engine.pt"
        state = load_weights_only(path)
        with refuse_mismatch(directory):
            self.module.load_state_dict(state["model"])
            self.load_state_dict(state)
        return state["client"]


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
                     store_file: str | None = None) -> None:
    """torch.distributed through DeepSpeed, from explicit coordinates (no launcher, no MPI probing).
    `store_file`: meet through a file store instead of a TCP store at master_addr:master_port."""
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    if backend == "gloo":
        # DeepSpeed would JIT-compile its shared-memory CPU all-reduce (a C++ build of a minute in the
        # torch-extensions dir, and a lock there if the build is killed); gloo's all-reduce serves.
        import deepspeed.ops
        getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world_size,
                               init_method=f"file://{store_file}" if store_file else None)


class DeepSpeedEngine:
    """`deepspeed.initialize` around our model, AdamW and schedule (ZeRO stage and bf16 from config).

    The optimizer is a client torch AdamW: DeepSpeed's fused Adam JIT-compiles C++ for minutes
    and buys nothing on CPU. Call `init_distributed` first.
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], total_steps: int, warmup_steps: int,
                 grad_clip: float, micro_batch: int, world_size: int, zero_stage: int = 0, bf16: bool = False):
        import deepspeed

        optimizer, scheduler = _optimizer(param_groups, total_steps, warmup_steps)
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                  "train_batch_size": micro_batch * world_size, "gradient_clipping": grad_clip,
                  "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine)
        self.module = self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> float | None:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # None under ZeRO 0
        return None if norm is None else float(norm)

    def save(self, directory: Path, client_state: dict) -> None:
        """Every rank writes its shard of the state into `directory` (tag "ds")."""
        self.engine.save_checkpoint(str(directory), tag="ds", client_state=client_state, save_latest=False)

    def load(self, directory: Path) -> dict:
        with refuse_mismatch(directory):
            path, client = self.engine.load_checkpoint(str(directory), tag="ds")
        if path is None:
            raise InputError(f"{directory}: no DeepSpeed checkpoint (tag 'ds') to resume from")
        return client  # DeepSpeed has already taken its own keys out


def load_weights_only(path: Path, map_location="cpu"):
    """torch.load that never unpickles code; anything else is refused with an error naming the file."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise InputError(f"{path}: refused: not a weights-only torch checkpoint "
                         f"({str(e).splitlines()[0][:200]})") from None


@contextlib.contextmanager
def refuse_mismatch(directory: Path):
    """A state of another model size or layout -> one line naming the checkpoint."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as e:
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"{directory}: checkpoint of another model size or layout: {msg}") from None


def _weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` (no arbitrary unpickling).

    ZeRO optimizer states carry DeepSpeed's `LossScaler`; that one class is allow-listed.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler]):
                return load_weights_only(Path(path), map_location)

    return WeightsOnlyCheckpointEngine(engine._config)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, head_lr: float,
                 head_prefixes: tuple[str, ...] = ()) -> list[dict]:
    """Pre-trained weights at `lr`; freshly initialized heads (by name prefix) at `head_lr`."""
    seen, body, heads = set(), [], []
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (heads if name.startswith(head_prefixes) else body).append(p)
    groups = [{"params": body, "lr": lr}]
    if heads:
        groups.append({"params": heads, "lr": head_lr})
    return groups
