"""The one place an optimizer wraps the model: AdamW, warmup + linear decay, grad clipping.

The training loop only calls `engine.step(loss)`, so a DeepSpeed engine (same interface) can be
dropped in at the cluster edge without touching the loop or the model.
"""
from __future__ import annotations

import torch


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class TorchEngine:
    def __init__(self, param_groups: list[dict], total_steps: int, warmup_steps: int, grad_clip: float = 1.0):
        self.params = [p for g in param_groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: linear_warmup_decay(s, warmup_steps, total_steps))
        self.grad_clip = grad_clip

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
