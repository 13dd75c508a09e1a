"""The `fxlora` command: `fxlora explain ...` prints the site report of a model; `fxlora bench ...` runs the benchmark.

    fxlora explain --family llama --hidden 64 --layers 1 --r 8 --targets all-linear --seq 32
    fxlora explain --hf-config config.json --peft-config adapter_config.json --seq 128
    fxlora bench --quick                  # every option of `python -m fxlora.bench`; see `fxlora bench --help`
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from fxlora.config import json_object
from fxlora.cost import timing
from fxlora.testing.models import FAMILIES


def _json_object(ctx, param, value: Optional[str]):
    if value is None:
        return None
    try:
        return json_object(value, "--options")
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _read_json(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fxlora")
def main() -> None:
    """fxlora: a torch.compile backend that finds LoRA adapters by their math and compiles them lean."""


@main.command()
@click.option("--family", type=click.Choice([*FAMILIES, "dit"]), default="llama", show_default=True,
              help="a small random-init model of this family (ignored with --hf-config)")
@click.option("--hidden", type=int, default=64, show_default=True, help="hidden size")
@click.option("--layers", type=int, default=1, show_default=True, help="transformer layers")
@click.option("--heads", type=int, default=4, show_default=True, help="attention heads")
@click.option("--intermediate", type=int, default=None, help="MLP width [2 x hidden]")
@click.option("--vocab", type=int, default=128, show_default=True, help="vocabulary size")
@click.option("--hf-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a Hugging Face config.json (needs model_type); the model is built from it, random-init, never downloaded")
@click.option("--peft-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a PEFT adapter_config.json / LoraConfig as JSON (overrides --r/--alpha/--dropout/--targets)")
@click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank")
@click.option("--alpha", type=int, default=16, show_default=True, help="LoRA alpha")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="LoRA dropout")
@click.option("--targets", default="all-linear", show_default=True,
              help="'all-linear', 'attention', or comma-separated module names")
@click.option("--seq", type=int, default=32, show_default=True, help="sequence length (tokens; DiT: patches per side x 2)")
@click.option("--batch", type=int, default=1, show_default=True, help="batch size")
@click.option("--options", callback=_json_object, default=None, metavar="JSON",
              help="fxlora options as for torch.compile(options=...), e.g. '{\"objective\": \"flops\"}'")
@click.option("--verbose", "-v", is_flag=True, help="also every candidate form of each site, with its formulas")
def explain(family, hidden, layers, heads, intermediate, vocab, hf_config, peft_config, rank, alpha, dropout,
            targets, seq, batch, options, verbose) -> None:
    """Print the site report for a model + LoRA config: one traced forward, nothing compiled."""
    import fxlora
    from fxlora.testing import models

    targets = targets if targets in ("all-linear", "attention") else [t.strip() for t in targets.split(",") if t.strip()]
    lora = dict(r=rank, alpha=alpha, dropout=dropout, targets=targets)
    if family == "dit" and hf_config is None:
        from fxlora.testing.diffusion import dit_batch, tiny_dit, with_dit_lora

        model = with_dit_lora(tiny_dit(hidden=hidden, layers=layers, heads=heads), **lora, peft_config=_read_json(peft_config))
        inputs = dit_batch(batch, seq)
    else:
        if hf_config is not None:
            model, family = _model_from_hf_config(_read_json(hf_config))
        else:
            model = models.tiny_model(family, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                                      vocab=vocab)
        peft = _read_json(peft_config)
        model = models.with_lora(model, family, **lora) if peft is None else _with_peft_config(model, peft)
        inputs = models.token_batch(batch, seq, vocab=model.config.vocab_size)
    click.echo(fxlora.explain(model, options=options, **inputs).format(verbose=verbose))


def _model_from_hf_config(config: dict):
    """A random-init causal LM (masked LM for BERT-likes) from a config.json dict; its fxlora family name."""
    import transformers as tf

    if "model_type" not in config:
        raise click.UsageError("--hf-config needs a 'model_type' key (e.g. \"llama\")")
    cfg = tf.AutoConfig.for_model(**config)
    model_cls = tf.AutoModelForMaskedLM if cfg.model_type == "bert" else tf.AutoModelForCausalLM
    family = cfg.model_type if cfg.model_type in FAMILIES else "llama"
    return model_cls.from_config(cfg), family


def _with_peft_config(model, peft: dict):
    """PEFT from an adapter_config.json dict (keys LoraConfig does not know, like peft_type, are dropped)."""
    import dataclasses

    from peft import LoraConfig, get_peft_model

    from fxlora.testing.models import randomize_lora_B

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in peft.items() if k in known and k not in ("peft_type", "task_type", "base_model_name_or_path")}
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    randomize_lora_B(peft_model)
    return peft_model


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args) -> None:
    """Run the benchmark (`python -m fxlora.bench`) with a progress bar; writes JSON/CSV/Markdown and plots.

    Every option is the benchmark's own: `fxlora bench --help` lists them.
    """
    from fxlora.bench.__main__ import main as bench_main

    sys.exit(bench_main(["--help"] if "-h" in bench_args else list(bench_args)))


@main.command()
@click.option("--show", is_flag=True, help="list every cached form time, its spread, per device (the default)")
@click.option("--clear", is_flag=True, help="forget them: the next compile of each shape measures again")
def timings(show, clear) -> None:
    """The form times objective="time" measured and cached (FXLORA_CACHE_DIR, default ~/.cache/fxlora)."""
    path = timing.cache_path()
    if clear:
        click.echo(f"cleared {path}" if timing.clear(path) else f"nothing cached at {path}")
        return
    figures = timing.cached(path)
    if not figures:
        click.echo(f"nothing cached at {path}")
        return
    click.echo(f"{path}:")
    for device, entries in figures.items():
        click.echo(f"  {device}: {len(entries)} form times")
        for key, (seconds, spread) in sorted(entries.items()):
            noise = "spread -" if spread is None else f"spread {spread:.0%}"
            click.echo(f"    {seconds * 1e3:9.3f} ms  {noise:>10}  {key}")


if __name__ == "__main__":
    main()
