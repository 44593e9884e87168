"""torch.compile(fullgraph=True) sees fused_dense as one op and matches eager, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import genfast
from genfast.nn import FusedLinear
from tests.conftest import compiled_op_targets, require_backend


def model() -> nn.Sequential:
    return nn.Sequential(
        FusedLinear(20, 32, activation="relu"),
        FusedLinear(32, 16, activation="gelu"),
        FusedLinear(16, 8, activation="leaky_relu"),
        FusedLinear(8, 4, activation="sigmoid"),
    )


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_model_matches_eager(dynamic):
    require_backend("cpu", "cpu")
    torch._dynamo.reset()
    eager = model()
    compiled_copy = model()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_copy, fullgraph=True, dynamic=dynamic)
    with genfast.use_backend("cpu"):  # the C++ kernels on both sides, whatever the default
        for batch in (7, 13):
            x = torch.randn(batch, 20)
            out_eager, out_compiled = eager(x), compiled(x)
            torch.testing.assert_close(out_compiled, out_eager)
            out_eager.square().sum().backward()
            out_compiled.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_compiled_graph_contains_the_custom_op():
    require_backend("cpu", "cpu")
    seen = compiled_op_targets(FusedLinear(5, 3, activation="tanh"), torch.randn(2, 5))
    assert any("genfast.fused_dense" in target for target in seen), seen


def test_compiling_a_fused_model_emits_no_lru_cache_warning(monkeypatch):
    """The defect: backend.select, traced by Dynamo on every fused_dense call, reached a functools.lru_cache
    and Dynamo warned on every graph that it traces through the cache wrapper."""
    from genfast.models import VAE

    monkeypatch.setattr(genfast.backend, "_ENVIRONMENT_PIN", None)  # unpinned: select's default path
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set(), raising=False)  # warned before or not
    torch._dynamo.reset()
    vae = VAE(in_features=12, hidden=(8,), latent=3)
    compiled = torch.compile(lambda x: vae.loss(x), fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.rand(5, 12)).backward()
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
