"""Weight normalization (method.md section 5): after every optimizer step, project each weight matrix to
unit L2 norm — each row for matrices that read the hidden state, each column for matrices whose output is
added back to it. Used with Adam without weight decay."""

from __future__ import annotations

import torch
import torch.nn as nn

# Matrices that read the (normalised) hidden state: normalise each output row.
READS_HIDDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "in_proj", "b_proj", "a_proj", "g_proj")
# Matrices whose output is added back to the residual stream: normalise each input column.
WRITES_RESIDUAL = ("o_proj", "down_proj", "out_proj")


def weight_norm_axes(model: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, dim to normalise over) for every Linear in the operator stack.

    dim=1 normalises rows (W is out x in: each row W[i, :]); dim=0 normalises columns. A Linear whose role is
    not known is an error, so a new operator has to say which kind each matrix is.
    """
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in READS_HIDDEN:
            out.append((name, module.weight, 1))
        elif leaf in WRITES_RESIDUAL:
            out.append((name, module.weight, 0))
        else:
            raise ValueError(
                f"weight normalization: unknown role of Linear {name!r}; add its name to "
                f"READS_HIDDEN or WRITES_RESIDUAL in models/weight_norm.py"
            )
    return out


@torch.no_grad()
def normalize_weights(model: nn.Module, eps: float = 1e-8) -> None:
    for _name, weight, dim in weight_norm_axes(model):
        norms = weight.norm(dim=dim, keepdim=True).clamp_min(eps)
        weight.div_(norms)
