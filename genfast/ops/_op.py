"""The one helper that defines a genfast op, and the one place that decides how a call reaches a kernel.

An ``Op`` is registered once as ``genfast::<name>`` (``torch.library.define``: one style for every op,
including those whose ``Generator?`` argument rules out ``custom_op``), with its fake, its kernel on
each backend and one autograd rule: ``setup(ctx, inputs, outputs)`` saves what backward needs,
``backward(ctx, *grads)`` returns one gradient per input, ``double_backward`` is either a rule for
``create_graph=True`` or the reason there is none (a C++ node calls ``cpp_double_backward``, the same rule in
the node's arguments, or takes the message of the error from Python). Calling the Op routes the call:

- traced (``torch.compile``, ``torch.jit.trace``): the registered op, so the graph holds ``genfast::<name>``
  and AOTAutograd sees the same autograd rule;
- eager, no gradient needed: the selected backend's kernel, nothing else;
- eager with gradients: the rule wrapped in an ``autograd.Function`` (torch.library's Python dispatch
  costs ~100 us a call, more than the kernels of small inputs; an autograd.Function a few us), or the
  op's C++ autograd node (``cpp_node``) where the backend has one.

A backward rule calls the ops it needs through ``op.run(ctx.backend, ...)``: the forward's backend in
eager mode (backward runs where its forward ran, on whatever thread autograd uses), the registered op
when traced (``ctx.backend`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from genfast import backend
from genfast._extension import _C
from genfast.ops import _route

Kernel = Callable[..., object]


@dataclass(frozen=True)
class Kernels:
    """The op's kernel on each backend; cpu, cuda and triton as functions that return it, called on first
    use (genfast._C may be absent and Triton is optional where they are never selected)."""

    reference: Kernel
    cpu: Callable[[], Kernel]
    cuda: Callable[[], Kernel]
    triton: Callable[[], Kernel]


class Op:
    def __init__(
        self,
        name: str,
        schema: str,
        kernels: Kernels,
        fake: Callable,
        *,
        setup: Callable | None = None,
        backward: Callable | None = None,
        double_backward: Callable | str | None = None,
        nondifferentiable: Sequence[int] = (),
        cpp_node: Callable[[], Kernel] | None = None,
        cpp_double_backward: Callable | None = None,
        tags: Sequence[torch.Tag] = (),
    ):
        self.name = name
        self._kernels = kernels
        self._resolved: dict[str, Kernel] = {"reference": kernels.reference}
        self._setup, self._backward, self._double_backward = setup, backward, double_backward
        self._nondifferentiable = tuple(nondifferentiable)
        self._cpp_node = cpp_node
        qualname = f"genfast::{name}"
        torch.library.define(qualname, schema, tags=tuple(tags))
        torch.library.impl(qualname, "default", func=self._registered_kernel)
        torch.library.register_fake(qualname, fake)
        if backward is not None:
            torch.library.register_autograd(
                qualname, self._autograd_backward, setup_context=self._traced_setup
            )
        self.op = getattr(torch.ops.genfast, name).default
        # The dispatcher leaves out trailing arguments at their default (a None generator); kernels take all.
        self._defaults = tuple(a.default_value for a in self.op._schema.arguments)
        self._function = _eager_function(self) if backward is not None else None
        if cpp_node is not None and _C is not None:
            # The C++ node's create_graph backward: the op's graph-building rule in the node's arguments,
            # or the message of the error to raise.
            _C.set_double_backward(name, cpp_double_backward or self._no_double_backward)

    # ----------------------------------------------------------------------------------------------
    # Routes

    def __call__(self, *args):
        """The op's outputs (a tuple) for `args` in the op's schema order; see the module docstring."""
        # This runs on every eager call of a small op, where each microsecond shows: kept short.
        if _route.traced():
            return self.op(*args)
        name = backend.select(args[0].device)
        if self._function is not None and torch.is_grad_enabled() and _requires_grad(args):
            if self._cpp_node is not None and name in _NODE_BACKENDS:
                return self.kernel("node")(*args)
            return self._function.apply(*args)
        return self.kernel(name)(*args)

    def run(self, backend_name: str | None, *args):
        """The op on `backend_name`'s kernel, inputs made contiguous; the registered op for None (traced)."""
        if backend_name is None:
            return self.op(*args)
        return self.kernel(backend_name)(*(a.contiguous() if isinstance(a, Tensor) else a for a in args))

    def kernel(self, backend_name: str) -> Kernel:
        """The kernel of a backend, or the C++ autograd node ("node"), resolved on first use."""
        kernel = self._resolved.get(backend_name)
        if kernel is None:
            resolve = self._cpp_node if backend_name == "node" else getattr(self._kernels, backend_name)
            kernel = self._resolved[backend_name] = resolve()
        return kernel

    def _registered_kernel(self, *args):
        # A graph may hand the op non-contiguous tensors; the kernels take contiguous ones.
        args += self._defaults[len(args) :]
        out = self.run(backend.select(args[0].device), *args)
        return tuple(out) if isinstance(out, (list, tuple)) else out

    # ----------------------------------------------------------------------------------------------
    # Autograd: one rule, two registrations (the registered op's and the eager autograd.Function's)

    def _traced_setup(self, ctx, inputs, output) -> None:
        ctx.backend = None
        self.setup(ctx, inputs, output)

    def setup(self, ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros allocated
        self._setup(ctx, inputs, output)

    def _autograd_backward(self, ctx, *grads):
        if torch.is_grad_enabled():  # backward(create_graph=True); AOTAutograd traces backward without grad
            if callable(self._double_backward):
                return self._double_backward(ctx, *grads)
            raise RuntimeError(self._no_double_backward())
        return self._backward(ctx, *grads)

    def _no_double_backward(self) -> str:
        return f"genfast {self.name} has no double backward (backward with create_graph=True)" + (
            f": {self._double_backward}" if self._double_backward else ""
        )


_NODE_BACKENDS = ("cpu", "cuda")  # the backends whose eager autograd may be a C++ node


def plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The sum of two optional gradients (None: no gradient reached that path, materialized nowhere)."""
    return b if a is None else a if b is None else a + b


def _requires_grad(args) -> bool:
    for a in args:  # a loop, not any() over a generator: half the cost on this hot path
        if isinstance(a, Tensor) and a.requires_grad:
            return True
    return False


def _eager_function(op: Op) -> type[torch.autograd.Function]:
    """The op's autograd rule as an autograd.Function on the selected backend's kernel (eager mode)."""

    def forward(ctx, *args):
        ctx.backend = backend.select(args[0].device)
        output = op.kernel(ctx.backend)(*args)
        op.setup(ctx, args, output)
        if isinstance(output, Tensor):
            return output
        if op._nondifferentiable:
            ctx.mark_non_differentiable(*(output[i] for i in op._nondifferentiable))
        return tuple(output)

    def backward(ctx, *grads):
        return op._autograd_backward(ctx, *grads)

    name = "".join(part.capitalize() for part in op.name.split("_"))
    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )
