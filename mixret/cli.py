"""The `mixret` command line: a thin click layer over the Python API."""
from __future__ import annotations

import functools

import click

from mixret.errors import MixretError


def friendly(fn):
    """Turn MixretError into a clean one-line error and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MixretError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixret")
def main():
    """mixret: retrieval embeddings from masked mixers.

    Pretrain a causal masked mixer (or a transformer baseline), embed a corpus with it,
    train a matcher on (summary, document) pairs, then index, search and evaluate.
    """


# --- models ----------------------------------------------------------------------------------

@main.command("models")
@click.option("--d-model", default=256, show_default=True, help="Model width.")
@click.option("--layers", "n_layers", default=8, show_default=True, help="Number of blocks.")
@click.option("--context", default=512, show_default=True, help="Maximum input length.")
@click.option("--vocab-size", default=4096, show_default=True, help="Vocabulary size.")
@friendly
def models_cmd(d_model, n_layers, context, vocab_size):
    """List the registered architectures with their parameter counts for one config."""
    from mixret.models import model_table
    click.echo(model_table(d_model=d_model, n_layers=n_layers, context=context, vocab_size=vocab_size))


# --- pretrain --------------------------------------------------------------------------------

# --- generate --------------------------------------------------------------------------------

# --- embed -----------------------------------------------------------------------------------

# --- train-matcher ---------------------------------------------------------------------------

# --- index / search / evaluate ---------------------------------------------------------------

# --- quickstart ------------------------------------------------------------------------------

# --- bench -----------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
