"""Layer names: every name a person may give for a layer, and the graph node it means.

A layer is a graph node name (torchvision's ``get_graph_node_names`` style), a
``named_modules()`` name (a container means the value its ``forward`` returns; a module
called several times means its last call), ``<module>_0`` for a module's first call, or
an alias (the papers' names, :mod:`zfvis.core.aliases`).
"""

from __future__ import annotations

import difflib

from ..io.errors import InputTypeError, UnsupportedModelError, UserInputError
from .graph import GraphNode, ModelGraph

__all__ = ["LayerNames"]


class LayerNames:
    """The accepted layer names of one traced model.

    Args:
        graph: The traced model.
        aliases: Alias -> layer name; each must name a layer and hide none.

    Raises:
        UserInputError: An alias names no layer, or would hide one.
    """

    def __init__(self, graph: ModelGraph, aliases: dict[str, str]) -> None:
        self.graph = graph
        self.table = _layer_table(graph)
        self.aliases = aliases
        for alias, target in aliases.items():
            if target not in self.table:
                raise UserInputError(f"alias '{alias}' names '{target}', which is not a layer of the model")
            if alias in self.table and self.table[alias] is not self.table[target]:
                raise UserInputError(f"alias '{alias}' would hide the model's own layer '{alias}'; choose another alias")

    @classmethod
    def fitting(cls, graph: ModelGraph, aliases: dict[str, str]) -> dict[str, str]:
        """The aliases that name a layer of ``graph`` and hide none of its own."""
        table = cls(graph, {}).table
        return {a: t for a, t in aliases.items() if t in table and (a not in table or table[a] is table[t])}

    def names(self, *, aliases: bool = True) -> list[str]:
        """Names accepted as ``layer``: the aliases (if any), then every graph node in
        execution order (torchvision's node names), then module names that are not node
        names (containers, modules called several times), then ``<module>_0`` for the
        first call of a module called several times."""
        return (list(self.aliases) if aliases else []) + [n for n in self.table if n not in self.aliases]

    def node(self, layer: str) -> GraphNode:
        """The node a layer name or alias means.

        Raises:
            InputTypeError: ``layer`` is not a str.
            UserInputError: Unknown name; the message lists the closest valid names.
        """
        if not isinstance(layer, str):
            raise InputTypeError(f"layer must be a str, got {type(layer).__name__}")
        name = self.aliases.get(layer, layer)
        node = self.table.get(name)
        if node is not None:
            return node
        if name in self.graph.tuples:
            items = ", ".join(self.graph.tuples[name]) or "none"
            raise UnsupportedModelError(f"layer '{layer}' does not output one tensor (it returns a tuple or list); "
                                        f"choose one of its tensors: {items}")
        close = difflib.get_close_matches(layer, self.names(), n=4, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        holder = next((m for m in self.graph.opaque if name == m or name.startswith(m + ".")), None)
        quiet = self.graph.by_name.get(name) or self.graph.module_output.get(name)
        if holder is not None:
            kind = f"inside module '{holder}', which could not be traced ({self.graph.opaque[holder]})"
        elif quiet is not None:  # a node of the graph that carries no signal
            kind = ("a layer whose output does not depend on the images as zfvis traces the model: it is computed "
                    "from constants, from values made with gradients off (torch.no_grad(), detach()), or from a "
                    "tensor made from a shape alone (torch.zeros_like(x)) and then written through a view "
                    "(z.narrow(1, 0, 3).copy_(y): write that one whole, or out of place with torch.cat)")
        else:
            kind = "not a layer of the model"
        raise UserInputError(
            f"layer '{layer}' is {kind}.{hint} Hint: use Deconvnet.layer_names() (or `zfvis layers`) for the valid names"
        )


def _layer_table(graph: ModelGraph) -> dict[str, GraphNode]:
    """Every accepted layer name (node names, module names, ``<module>_0``) -> its node."""
    names: dict[str, GraphNode] = {}
    for node in graph.nodes[1:]:
        if node.carries:
            names[node.name] = node
    for module, node in graph.module_output.items():
        if module and node.carries:
            names[module] = node  # a module name means its (last) output
    for module, node in graph.first_call.items():
        if node.carries:
            names.setdefault(f"{module}_0", node)
    return names
