import pytest
import torch

import fxlora
from fxlora.config import Config


def test_defaults_and_frozen():
    cfg = fxlora.Config()
    assert cfg.inner == "inductor" and dict(cfg.inductor) == {}
    with pytest.raises(Exception):
        cfg.inner = "eager"
    assert Config.from_options({"inner": "eager"}) == Config(inner="eager")
    assert Config.from_options(cfg) is cfg


@pytest.mark.parametrize(
    "options, message",
    [
        ({"innr": "eager"}, "unknown fxlora option 'innr'; allowed options: inner"),
        ({"inner": "tvm"}, "'inner' must be one of 'inductor', 'aot_eager', 'eager'; got 'tvm'"),
        ({"inductor": {"no_such_knob": 1}}, "unknown Inductor config keys ['no_such_knob']"),
        ({"inductor": ["max_autotune"]}, "'inductor' must be a dict"),
        ({"dump_graphs": 3}, "'dump_graphs' must be a directory path"),
        ("inner=eager", "options must be a dict or fxlora.Config"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(ValueError) as err:
        Config.from_options(options)
    assert message in str(err.value)


def test_bad_options_fail_at_compile_time_with_the_value_error():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="fxlora", options={"colour": "red"})
    with pytest.raises(Exception) as err:
        compiled(torch.randn(2, 4))
    assert "unknown fxlora option 'colour'" in str(err.value)
    assert isinstance(getattr(err.value, "inner_exception", err.value), ValueError)


def test_bad_mode_is_named():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="fxlora", mode="fastest")
    with pytest.raises(Exception, match="'mode' must be one of 'default'"):
        compiled(torch.randn(2, 4))


def test_inductor_keys_at_the_top_level_go_to_inductor():
    """A script that passed options={"epilogue_fusion": True} to Inductor keeps working under fxlora."""
    cfg = Config.from_options({"epilogue_fusion": True, "inner": "aot_eager"})
    assert dict(cfg.inductor) == {"epilogue_fusion": True} and cfg.inner == "aot_eager"
    both = Config.from_options({"epilogue_fusion": True, "inductor": {"max_autotune": False}})
    assert dict(both.inductor) == {"epilogue_fusion": True, "max_autotune": False}
    with pytest.raises(ValueError, match=r"\['epilogue_fusion'\] given twice"):
        Config.from_options({"epilogue_fusion": True, "inductor": {"epilogue_fusion": False}})
    with pytest.raises(ValueError, match="unknown fxlora option 'epilogue_fusio'.*any key of torch._inductor.config"):
        Config.from_options({"epilogue_fusio": True})


def test_top_level_inductor_option_compiles():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="fxlora", options={"epilogue_fusion": True, "inner": "aot_eager"})
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x))
