import pytest
import sympy

from fxlora import cost
from fxlora.cost import I, O, R, T

# RunLoRA (seed 004) Table 1, backward6 corrected to the GEMMs it names (see backward_flops).
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
    shape = cost.SiteShape(T, I, O, R, 4, 4)
    assert sympy.expand(cost.forward_flops(1, False) - 2 * T * (I * O + R * I + O * R)) == 0
    assert sympy.expand(cost.forward_flops(2, False) - 2 * (I * O * R + T * O * I)) == 0
    for k, formula in TABLE_1.items():
        assert sympy.expand(cost.backward_flops(k, shape, False) - formula) == 0, k


def _choose(tokens, **kw):
    shape = cost.SiteShape(sympy.Integer(tokens), 512, 512, 8, 4, 4, **kw)
    return cost.choose_form(cost.price(shape))


def test_merged_forms_win_on_many_tokens_and_lose_on_few():
    assert _choose(4096)[0].form.name == "f2/b5"
    assert _choose(16)[0].form.name == "f1/b1"


def test_dropout_rules_out_merged_forms():
    best, _ = _choose(4096, dropout=True)
    assert best.form.forward == 1 and cost.BACKWARD_FORMS[best.form.backward][2] == "split"


def test_frozen_A_saves_xa_not_x():
    shape = cost.SiteShape(sympy.Integer(1024), 512, 512, 8, 4, 4, a_trainable=False)
    best, _ = cost.choose_form(cost.price(shape))
    assert best.saved_bytes == 1024 * 8 * 4
    assert cost.peft_saved_bytes(shape).subs({T: 1024, R: 8}) == 1024 * 8 * 4


def test_forced_form_and_illegal_force_explained():
    priced = cost.price(cost.SiteShape(sympy.Integer(64), 64, 64, 4, 4, 4, dropout=True))
    best, why = cost.choose_form(priced, forced=(1, 3))
    assert best.form.name == "f1/b3" and "forced" in why
    best, why = cost.choose_form(priced, forced=(2, 4))
    assert best.form.forward == 1 and "illegal here (dropout" in why


def test_cost_model_and_op_agree_on_the_backward_forms():
    """Both leaf modules spell RunLoRA's table out (neither imports the other); keep them one table."""
    from fxlora.ops import lora

    assert cost.BACKWARD_FORMS == lora.BACKWARD_FORMS


@pytest.mark.parametrize("forward,backward", [(f, b) for f in (1, 2) for b in cost.BACKWARD_FORMS])
def test_merged_weight_is_priced_only_where_a_form_builds_it(forward, backward):
    """Forward 2 and the merged-dX backwards build W + s B A (o x i) inside the op (docs/distributed.md)."""
    shape = cost.SiteShape(T, I, O, R, x_bytes=4, adapter_bytes=4)
    merged = forward == 2 or cost.BACKWARD_FORMS[backward][2] == "merged"
    assert cost.transient_bytes(forward, backward, shape) == (4 * O * I if merged else 0)
    no_dx = cost.SiteShape(T, I, O, R, x_bytes=4, adapter_bytes=4, x_needs_grad=False)
    assert cost.transient_bytes(forward, backward, no_dx) == (4 * O * I if forward == 2 else 0)
    priced = cost.price_form(cost.Form(forward, backward, 0, 0, True, transient_bytes=O * I * 4),
                             cost.SiteShape(8, 16, 32, 4, x_bytes=4, adapter_bytes=4))
    assert priced.transient_bytes == 32 * 16 * 4
