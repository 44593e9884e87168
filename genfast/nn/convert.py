"""convert/revert: nn.Linear + activation inside nn.Sequential <-> FusedLinear, in place.

The activation's slot in the Sequential becomes an nn.Identity (and back), so every other module
keeps its index and the state_dict keys do not change either way.
"""

from __future__ import annotations

import warnings

from torch import nn

from genfast.activations import activation_from_module, activation_module
from genfast.nn.linear import FusedLinear


def _fused_from(linear: nn.Linear, activation: str, slope: float) -> FusedLinear:
    fused = FusedLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        activation=activation,
        negative_slope=slope,
        device="meta",
    )
    fused.weight, fused.bias = linear.weight, linear.bias  # the very Parameters: optimizers stay valid
    fused.train(linear.training)
    return fused


def _plain_from(fused: FusedLinear) -> nn.Linear:
    linear = nn.Linear(fused.in_features, fused.out_features, bias=fused.bias is not None, device="meta")
    linear.weight, linear.bias = fused.weight, fused.bias
    linear.train(fused.training)
    return linear


_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def convert(model: nn.Module) -> nn.Module:
    """Replace each nn.Linear directly followed by a fusable activation in an nn.Sequential.

    A pair whose linear layer or activation carries hooks stays as it is, with a warning: a forward
    hook on the linear layer would see the activated output, and one on the activation would not run.
    """
    for prefix, seq in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for name, next_name in zip(names, names[1:]):
            linear, act = seq._modules[name], seq._modules[next_name]
            found = activation_from_module(act) if type(linear) is nn.Linear else None
            if found is None:
                continue
            if _hooked(linear) or _hooked(act):
                where = f"{prefix}.{name}" if prefix else name
                warnings.warn(
                    f"genfast.nn.convert: left {where!r} and its activation unfused: they carry hooks, "
                    "which a fused layer cannot run at the same place; remove the hooks to fuse it",
                    stacklevel=2,
                )
                continue
            seq._modules[name] = _fused_from(linear, *found)
            seq._modules[next_name] = nn.Identity()
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn every FusedLinear back into nn.Linear + the plain activation module.

    Inside an nn.Sequential the activation goes back into the Identity slot convert() left, so the
    state_dict keys are unchanged. Elsewhere the FusedLinear becomes nn.Sequential(linear, act), whose
    keys gain a ".0" (there is no other place to put the activation).
    """
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            fused = parent._modules[name]
            if not isinstance(fused, FusedLinear):
                continue
            linear = _plain_from(fused)
            act = activation_module(fused.activation, fused.negative_slope)
            next_name = names[i + 1] if i + 1 < len(names) else None
            if fused.activation == "none":
                parent._modules[name] = linear
            elif (
                isinstance(parent, nn.Sequential)
                and next_name
                and type(parent._modules[next_name]) is nn.Identity
            ):
                parent._modules[name], parent._modules[next_name] = linear, act
            else:
                parent._modules[name] = nn.Sequential(linear, act)
    if isinstance(model, FusedLinear):
        raise ValueError("revert: pass the model that contains the FusedLinear, not the layer itself")
    return model


__all__ = ["convert", "revert"]
