"""The prepared graph under construction: what every emitter of ``prepare_qat_fx`` builds with.

A :class:`Rewriter` holds the user's captured graph (its modules, integer region and the op of each node of the
region), the new graph, its modules and the new node of each old one, and the tools the emitters of
:mod:`.canonical_emitters` share: adding a canonical op, copying a node, naming a functional op's module, the
quantizer of an op's output, and the error that leaves an op in float. Reading a value across a float boundary
is :mod:`.float_boundaries`' job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx
from torch import nn

from edgeq.errors import QuantizationError, UnsupportedOpError
from edgeq.quantization.fake_quantize import ActivationFakeQuantize
from edgeq.quantization.float_boundaries import FloatBoundaries
from edgeq.quantization.fusion import Fusion
from edgeq.quantization.graph import constant_tensors, describe_node, getattr_path, module_scope
from edgeq.quantization.patterns import SUPPORTED_OPS, source_op
from edgeq.quantization.qconfig import QConfig, default_qat_qconfig
from edgeq.targets import Rounding, ScaleRule, Target


class Rewriter:
    """Builds the prepared graph node by node (one instance per call of ``prepare_qat_fx``).

    ``fusions`` (the fusion each head node starts, :func:`edgeq.quantization.fusion.find_fusions`) is set by the
    driver before any emitter runs.
    """

    def __init__(
        self,
        traced: fx.GraphModule,
        region: set[fx.Node],
        target: Target,
        resolve: Callable[[str], QConfig | None],
        strict: bool,
    ) -> None:
        self.traced = traced
        self.strict = strict
        self.region = region
        self.region_names = {n.name for n in region}
        self.target = target
        self.scale_rule: ScaleRule = target.quantization.scale_rule
        self.rounding: Rounding = target.quantization.rounding
        self.resolve = resolve
        self.modules = dict(traced.named_modules())
        self.kinds = {node: source_op(node, self.modules) for node in region}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.new_modules: dict[str, nn.Module] = {}
        self.fusions: dict[fx.Node, Fusion] = {}
        self.floats = FloatBoundaries(self, constant_tensors(traced))

    def last(self, node: fx.Node) -> fx.Node:
        """The last node of the fusion ``node`` heads (``node`` itself when it heads none)."""
        fusion = self.fusions.get(node)
        return fusion.last if fusion else node

    # ---- copying float, shape and reshape nodes ------------------------------------------------------------
    def copy(self, node: fx.Node) -> fx.Node:
        """``node`` as it is: its arguments as an integer op reads them in the region, as they are outside (shape
        arithmetic, constants)."""
        if node.op == "call_module":
            self.new_modules[node.target] = self.modules[node.target]
        elif node.op == "get_attr":
            self.new_modules[node.target] = getattr_path(self.traced, node.target)
        return self.graph.node_copy(node, self.floats.integer_value if node in self.region else self._value_outside)

    def _value_outside(self, node: fx.Node) -> fx.Node:
        return self.env[node] if node in self.env else self.floats.float_outputs[node]

    def call(self, path: str, module: nn.Module, args: Sequence[object], source: fx.Node) -> fx.Node:
        """A call of the canonical op ``module``, added at ``path``, on the integer values of ``args``."""
        self.new_modules[path] = module
        mapped = fx.node.map_arg(tuple(args), self.floats.integer_value)
        new_node = self.graph.call_module(path, mapped)
        new_node.meta = dict(source.meta)
        return new_node

    def functional_path(self, node: fx.Node, base: str) -> str:
        """Where the canonical op of ``node`` goes: the module's own path (each further call of a module without
        weights nor quantizer, such as SPPF's max pool, gets ``<path>_1``...), or ``<scope>.<base>``, which names no
        other node of the region (a float op or data movement is written under its node's name)."""
        if node.op == "call_module":
            path = str(node.target)
            return self.unique_path(path, node) if path in self.new_modules else path
        scope = module_scope(node)
        return self.unique_path(f"{scope}.{base}" if scope else base, node)

    def unique_path(self, stem: str, node: fx.Node | None = None) -> str:
        """``stem``, or ``stem_1``, ``stem_2``... the first that names no module yet, nor a node of the region other
        than ``node``."""
        path, suffix = stem, 0
        while path in self.new_modules or path in self.modules or (path in self.region_names and path != getattr(node, "name", None)):
            suffix += 1
            path = f"{stem}_{suffix}"
        return path

    # ---- quantizers -----------------------------------------------------------------------------------------
    def qconfig(self, node: fx.Node, allows_int32: bool) -> QConfig:
        """The qconfig of ``node``'s module scope (the global one when it has none)."""
        qconfig = self.resolve(module_scope(node)) or self.global_qconfig
        if qconfig.output_dtype == "int32" and not allows_int32:
            raise QuantizationError(
                f"{describe_node(node, self.modules)}: its qconfig asks for an int32 output, which only a Conv2d or "
                "Linear followed by a DeQuantStub can give; set the int32 qconfig on that layer alone"
            )
        return qconfig

    def quantizer(self, node: fx.Node, path: str, fixed_scale: float | None = None, quantizes_float: bool = False) -> ActivationFakeQuantize:
        """The quantizer of the output of the canonical op at ``path`` (``fixed_scale``: a QuantStub's;
        ``quantizes_float``: the integer model quantizes this output from float, as at a QuantStub)."""
        observer = None if fixed_scale is not None else self.qconfig(node, allows_int32=False).activation_observer()
        return ActivationFakeQuantize(
            observer, self.scale_rule, fixed_scale=fixed_scale, owner=path, rounding=self.rounding, quantizes_float=quantizes_float
        )

    @property
    def global_qconfig(self) -> QConfig:
        """The model's qconfig (the default QAT qconfig when none is given)."""
        return self.resolve("") or default_qat_qconfig

    def unsupported(self, node: fx.Node, reason: str) -> UnsupportedOpError:
        """The error an emitter raises for settings edgeq cannot run in integers (the op then stays float)."""
        return UnsupportedOpError(
            f"{describe_node(node, self.modules)}: {reason}. Supported in the integer region: {SUPPORTED_OPS}. "
            "To keep this op in float, prepare without strict=True (it then runs in float on the CPU), or move it "
            "after a DeQuantStub (and re-enter with a QuantStub)",
            reason=reason,
        )
