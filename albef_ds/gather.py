"""How the model sees other ranks: a small object handed to it, never a global.

The model calls these methods and nothing else of the distributed world. In one process
(tests, evaluation, plain ``python``) :class:`SingleProcess` makes every gather the
identity; :class:`albef_ds.distributed.TorchGather` does real collectives.
"""
from __future__ import annotations

import torch


class SingleProcess:
    world_size = 1
    rank = 0

    def gather(self, tensor: torch.Tensor, kind: str = "") -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, without gradient."""
        return tensor.detach()

    def gather_with_grad(self, tensor: torch.Tensor, kind: str = "") -> torch.Tensor:
        """Concatenate along dim 0; backward sends each rank the gradient of its slice,
        summed over every rank's loss."""
        return tensor

    def select_rows(self, tensor: torch.Tensor, index: torch.Tensor, kind: str = "") -> torch.Tensor:
        """``gather(tensor)[index]``, moving only the selected rows; backward returns each
        row's gradient to the rank that owns it (summed over every rank that drew it)."""
        return tensor[index]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, without gradient."""
        return tensor.detach()


SINGLE_PROCESS = SingleProcess()
