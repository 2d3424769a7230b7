"""Helpers shared by tests that watch the operators a call dispatches."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPERATORS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class OperatorLog(TorchDispatchMode):
    """Records every ATen operator dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.operators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.append(func)
        return func(*args, **(kwargs or {}))

    def host_syncs(self):
        return [op for op in self.operators if op in HOST_SYNC_OPERATORS]
