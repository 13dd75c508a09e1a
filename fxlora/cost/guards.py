"""Sizes as sympy expressions, and the one place a cost comparison decides on them.

Deciding a relation between symbolic sizes through the ShapeEnv (`evaluate_expr`) installs
a Dynamo guard; reading it at the size hints installs none. `SizeDecider` does the second by
default (option `form_guards`), so fxlora's choices never multiply the graphs Dynamo compiles.
"""

from __future__ import annotations

from typing import Iterable

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


class SizeDecider:
    """Decides relations between sizes for the chooser, and remembers how each was decided.

    A relation true (or false) for every size the ShapeEnv allows needs no guard. Otherwise,
    with `guard=False` it is decided at the size hints (the sizes Dynamo traced with) and
    installs nothing: the graph serves every size, as Inductor's would, and fxlora compiles no
    more graphs than Inductor for the same script. With `guard=True` it goes through
    `ShapeEnv.evaluate_expr`, which installs a Dynamo guard: a shape that crosses a cost
    threshold recompiles into the other form.
    """

    def __init__(self, shape_env=None, guard: bool = False):
        self.shape_env, self.guard = shape_env, guard
        self.at_hint: list[str] = []  # relations decided at the size hints, no guard
        self.guarded: list[str] = []  # relations that installed a guard

    def __call__(self, relation: sympy.Basic) -> bool:
        if relation in (sympy.true, sympy.false):
            return bool(relation)
        env = self.shape_env
        if env is None or not relation.free_symbols:
            return bool(relation)
        static = env._maybe_evaluate_static(relation)
        if static is not None:
            return bool(static)
        if self.guard:
            self.guarded.append(str(relation))
            return bool(env.evaluate_expr(relation))
        value = bool(relation.xreplace({s: env.backed_var_to_val[s] for s in relation.free_symbols if s in env.backed_var_to_val}))
        self.at_hint.append(f"{relation} is {value}")
        return value

    def at_hints(self, expr) -> int:
        """An integer size expression at the size hints (installs no guard)."""
        expr = sympy.sympify(expr)
        env = self.shape_env
        if env is not None and expr.free_symbols:
            expr = expr.xreplace({s: env.backed_var_to_val[s] for s in expr.free_symbols if s in env.backed_var_to_val})
        return int(expr)

    def hints(self) -> str:
        """The size hints the unguarded choices were made at, e.g. "s0=2, s1=24"."""
        env = self.shape_env
        if env is None:
            return ""
        return ", ".join(f"{s}={env.backed_var_to_val[s]}" for s in sorted(env.backed_var_to_val, key=str) if str(s).startswith("s"))


def size_decider(gm: fx.GraphModule, guard: bool = False) -> SizeDecider:
    """The decider for `gm`'s sizes, on the ShapeEnv of its fake inputs (none: sizes are static)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        example = node.meta.get("example_value", node.meta.get("val"))
        fake_mode = getattr(example, "fake_mode", None)
        if fake_mode is not None and fake_mode.shape_env is not None:
            return SizeDecider(fake_mode.shape_env, guard)
    return SizeDecider(None, guard)
