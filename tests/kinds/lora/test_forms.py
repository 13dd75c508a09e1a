import pytest
import sympy

from fxlora.cost import core
from fxlora.cost.core import I, O, R, T
from fxlora.kinds.lora import forms as cost
from fxlora.ops.lora import BACKWARD_FORMS, FORWARD_FORMS

# RunLoRA (arXiv:2312.03415) Table 1, backward6 corrected to the GEMMs it names (see backward_flops).
TABLE_1 = {
    1: 2 * T * (2 * O * R + 3 * I * R + O * I),
    2: 2 * T * (O * R + 2 * I * R + 2 * I * O) + 2 * I * O * R,
    3: 2 * T * (2 * I * O + O * R + I * R) + 4 * I * R * O,
    4: 2 * (2 * T * I * O + 3 * I * O * R),
    5: 2 * T * (2 * O * R + 2 * I * R + O * I) + 2 * I * O * R,
    6: 2 * T * (2 * O * R + 2 * I * R + 2 * O * I) + 2 * I * O * R,
    7: 2 * T * (O * R + I * R + 2 * O * I) + 4 * I * O * R,
    8: 2 * T * (O * R + I * R + 2 * O * I) + 4 * I * O * R,
}


def test_formulas_are_runlora_table_1():
    shape = cost.LoraShape(T, I, O, R, 4, 4)
    assert sympy.expand(cost.forward_flops(1, False) - 2 * T * (I * O + R * I + O * R)) == 0
    assert sympy.expand(cost.forward_flops(2, False) - 2 * (I * O * R + T * O * I)) == 0
    for k, formula in TABLE_1.items():
        assert sympy.expand(cost.backward_flops(k, shape, False) - formula) == 0, k


def _choose(tokens, **kw):
    shape = cost.LoraShape(sympy.Integer(tokens), 512, 512, 8, 4, 4, **kw)
    return core.choose_form(core.price(cost.candidate_forms(shape), shape), flop_budget=0.1)


def test_merged_forms_win_on_many_tokens_and_lose_on_few():
    assert _choose(4096)[0].form.name == "f2/b5"
    assert _choose(16)[0].form.name == "f1/b1"


def test_dropout_rules_out_merged_forms():
    best, _ = _choose(4096, dropout=True)
    forward, backward = best.form.spec.forward, best.form.spec.backward
    assert forward == 1 and BACKWARD_FORMS[backward][2] == "split"


def test_frozen_A_saves_xa_not_x():
    shape = cost.LoraShape(sympy.Integer(1024), 512, 512, 8, 4, 4, a_trainable=False)
    best, _ = core.choose_form(core.price(cost.candidate_forms(shape), shape), flop_budget=0.1)
    assert best.saved_bytes == 1024 * 8 * 4
    assert cost.peft_saved_bytes(shape).subs({T: 1024, R: 8}) == 1024 * 8 * 4


def test_forced_form_and_illegal_force_explained():
    shape = cost.LoraShape(sympy.Integer(64), 64, 64, 4, 4, 4, dropout=True)
    priced = core.price(cost.candidate_forms(shape), shape)
    best, why = core.choose_form(priced, flop_budget=0.1, forced=("f1/b3", "force_form"))
    assert best.form.name == "f1/b3" and "forced by the force_form option" in why
    best, why = core.choose_form(priced, flop_budget=0.1, forced=("f2/b4", "force_form"))
    assert best.form.spec.forward == 1 and "illegal here (dropout" in why


@pytest.mark.parametrize("forward,backward", [(f, b) for f in FORWARD_FORMS for b in BACKWARD_FORMS])
def test_merged_weight_is_priced_only_where_a_form_builds_it(forward, backward):
    """Forwards 2, 3 and the merged-dX backwards build W + s B A (o x i) inside the op (docs/distributed.md)."""
    shape = cost.LoraShape(T, I, O, R, x_bytes=4, adapter_bytes=4)
    merged = forward in (2, 3) or BACKWARD_FORMS[backward][2] in ("merged", "merged_cat")
    assert cost.transient_bytes(forward, backward, shape) == (4 * O * I if merged else 0)
    no_dx = cost.LoraShape(T, I, O, R, x_bytes=4, adapter_bytes=4, x_needs_grad=False)
    assert cost.transient_bytes(forward, backward, no_dx) == (4 * O * I if forward in (2, 3) else 0)
    (priced,) = core.price([core.Form(f"f{forward}/b{backward}", 0, 0, transient_bytes=O * I * 4)],
                           cost.LoraShape(8, 16, 32, 4, x_bytes=4, adapter_bytes=4))
    assert priced.transient_bytes == 32 * 16 * 4
