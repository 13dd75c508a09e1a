"""Sizes as sympy expressions, and the one way a cost comparison may guard on them.

A relation between symbolic sizes decided through the ShapeEnv installs a Dynamo guard, so
a shape that crosses a cost threshold recompiles into the other form
(shared/notes: `evaluate_expr` guards, `statically_known_true` does not).
"""

from __future__ import annotations

from typing import Callable, Iterable

import sympy
import torch
import torch.fx as fx


def size_expr(size) -> sympy.Expr:
    """A size as a sympy expression: the SymInt's symbolic expression, or an Integer."""
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def tokens_expr(dims: Iterable) -> sympy.Expr:
    """The product of x's leading dims: the T of every cost formula."""
    tokens = sympy.Integer(1)
    for d in dims:
        tokens *= size_expr(d)
    return tokens


def size_decider(gm: fx.GraphModule) -> Callable[[sympy.Basic], bool]:
    """Evaluate a relation between sizes; on symbolic sizes this installs a Dynamo guard,
    so a shape that crosses a cost threshold recompiles into the other form."""
    shape_env = None
    for node in gm.graph.find_nodes(op="placeholder"):
        example = node.meta.get("example_value", node.meta.get("val"))
        fake_mode = getattr(example, "fake_mode", None)
        if fake_mode is not None and fake_mode.shape_env is not None:
            shape_env = fake_mode.shape_env
            break

    def decide(relation: sympy.Basic) -> bool:
        if relation in (sympy.true, sympy.false):
            return bool(relation)
        if shape_env is None or not relation.free_symbols:
            return bool(relation)
        return bool(shape_env.evaluate_expr(relation))

    return decide
