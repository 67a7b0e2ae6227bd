"""The interface every operator in the model zoo implements (mixers and the FFN alike).

    forward(x, cache=None, start=0) -> y
        Parallel form (training, prefill). x: (B, T, d_model) -> (B, T, d_model).
        cache=None: training, no state. Otherwise `cache` (from `init_cache`) holds the state after the
        first `start` tokens of the sequence (zeros when start == 0); the call consumes x, which sits at
        positions start .. start+T-1, and leaves the state after start+T tokens in `cache` (in place).
    step(x, cache, pos) -> y
        Recurrent form: decode one token. x: (B, d_model) -> (B, d_model); `pos` is a 0-dim long tensor on
        x's device (the token's position). Updates `cache` in place with static shapes and no host sync, so
        that a whole decode step can be captured in one CUDA graph.
    init_cache(batch, max_len, device, dtype) -> dict[str, Tensor]
        Preallocated, zero-filled, static-shaped cache for sequences of up to max_len tokens
        (meta tokens included).

Operators do not hold their pre-norm: `HybridLM` wraps each one in `norm -> op -> residual add`.
`backend` names the path in use ("torch" for the pure-torch reference, or a kernel library); every kernel
path has the torch reference beside it and the tests hold them equal.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.common import drop_cat_cache, share_storage


class Operator(nn.Module):
    backend: str = "torch"

    def decode_weight_groups(self) -> list[tuple[torch.Tensor, ...]]:
        """The weights the decode step multiplies as one matrix, group by group (in dim-0 order)."""
        return []

    def share_decode_weights(self) -> None:
        """Each decode weight group in one storage (`models.common.share_storage`): the decode step's fused
        matrices are views of the weights, not copies. Called at the end of `__init__`, after every move."""
        for group in self.decode_weight_groups():
            share_storage(group)

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.cuda()`, `.half()`, ...: drop weights cached for decode (`models.common.cached_cat`); the
        # moved weights are separate tensors again, so lay each group back into one storage.
        drop_cat_cache(self)
        module = super()._apply(fn, *args, **kwargs)
        self.share_decode_weights()
        return module

    def __getstate__(self):
        # pickling / deepcopy: the decode caches are rebuilt on demand, not carried
        state = self.__dict__.copy()
        state.pop("_cat_cache", None)
        return state

    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def step(self, x: torch.Tensor, cache: dict, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int, device, dtype) -> dict:
        return {}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states accumulate in at least float32 (bf16 states drift over long decodes)."""
    return torch.promote_types(dtype, torch.float32)
