"""Every default and help text of a command's options is its config's: the click options are generated from the
config dataclasses (mixret.options), so a second declaration cannot creep back. For each command: each option
that is not one of the command's own arguments is a config field, None unless given, its help the field's help
with the field's default; and the command run with no options builds exactly the config's defaults."""
import dataclasses

import click
import pytest
from click.testing import CliRunner

from mixret import cli
from mixret.errors import MixretError
from mixret.models.config import ModelConfig
from mixret.models.generate import SAMPLING
from mixret.options import all_options, field_default, flat_options
from mixret.quickstart import QuickstartConfig
from mixret.retrieval.embeddings import EmbedConfig
from mixret.retrieval.evaluate import EvaluateConfig
from mixret.retrieval.indexing import IndexConfig
from mixret.retrieval.search import RetrievalConfig
from mixret.training.finetune import FinetuneConfig
from mixret.training.matcher import TrainMatcherConfig
from mixret.training.text_task import TrainConfig

# command -> (its config with the command's defaults, parameters of its own, flags renamed)
COMMANDS = {
    "pretrain": (TrainConfig(), {"config_file"}, {}),
    "distill": (TrainConfig(objective="distill"), {"config_file", "student"},
                {"data": "texts", "text_field": "field", "distill_loss": "loss"}),
    "finetune": (FinetuneConfig(), {"config_file"}, {}),
    "train-matcher": (TrainMatcherConfig(), {"hard_negatives", "config_file"}, {}),
    "quickstart": (QuickstartConfig(), set(), {}),
    "index": (IndexConfig(), {"emb_dir"}, {}),
    "evaluate": (EvaluateConfig(), {"as_json"}, {}),
    "search": (RetrievalConfig(), {"query", "emb_dir", "mode", "k", "as_json"}, {}),
    "serve": (RetrievalConfig(), {"emb_dir", "host", "port", "threads", "max_batch", "max_wait_ms", "token_file"},
              {}),
    "embed": (EmbedConfig(), {"corpus", "model_dir", "out_dir"}, {}),
    "generate": (SAMPLING, {"prompt", "model_dir", "seed", "greedy"}, {}),
    "models": (ModelConfig(), {"vocab_size"}, {}),
}


def params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in cli.main.commands[command].params if p.name != "help"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_option_is_a_config_field_with_its_default_and_help(command):
    config, own, renamed = COMMANDS[command]
    fields, values = all_options(type(config)), flat_options(config)
    offered = {name for name, (_, f) in fields.items() if f.metadata.get("cli", True)}
    found = params(command)
    strays = sorted(set(found) - offered - own)
    assert not strays, f"{command}: options declared outside the config: {strays}"
    assert set(found) - own, f"{command}: no option comes from the config"
    for name, param in found.items():
        if name in own:
            continue
        f = fields[name][1]
        assert param.default is None, f"{command} {name}: a default beside the config's"
        assert param.help.startswith(f.metadata["help"]), f"{command} {name}: help not the field's"
        value, shown = values[name], f.metadata.get("show")
        if shown:
            assert param.help.endswith(f"[default: {shown}]"), param.help
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            assert param.help.endswith(f"[default: {value}]"), f"{command} {name}: {param.help}"
        flag = "--" + renamed.get(name, name).replace("_", "-")
        assert flag in param.opts or any(o.startswith(flag) for o in param.opts + param.secondary_opts) or \
            f.metadata.get("switch"), (command, name, param.opts)


def capture(monkeypatch, target: str):
    seen = []

    def fake(*args, **kwargs):
        seen.append(args)
        raise MixretError("captured")
    monkeypatch.setattr(cli, target, fake)
    return seen


@pytest.mark.parametrize("command,target,args", [
    ("finetune", "finetune", []), ("train-matcher", "run_train_matcher", []), ("quickstart", "run", []),
    ("index", "build_index", ["emb"]), ("evaluate", "evaluate", [])])
def test_the_command_with_no_options_builds_the_configs_defaults(monkeypatch, command, target, args):
    seen = capture(monkeypatch, target)
    result = CliRunner().invoke(cli.main, [command, *args])
    assert "captured" in result.output, result.output
    got = seen[0][-1]
    assert got == COMMANDS[command][0]


def test_pretrain_and_distill_with_no_options_build_their_defaults(monkeypatch):
    for command, expected in (("pretrain", TrainConfig()), ("distill", TrainConfig(objective="distill"))):
        seen = capture(monkeypatch, "pretrain")
        result = CliRunner().invoke(cli.main, [command])
        assert "captured" in result.output, result.output
        assert seen[0][0].to_dict() == expected.to_dict()


def test_given_options_reach_the_nested_configs(monkeypatch):
    seen = capture(monkeypatch, "finetune")
    CliRunner().invoke(cli.main, ["finetune", "--layers", "3", "--lr", "0.01", "--one-way", "--budget-minutes", "2"])
    cfg = seen[0][0]
    assert (cfg.model.n_layers, cfg.loop.lr, cfg.symmetric, cfg.loop.budget_minutes) == (3, 0.01, False, 2.0)
    assert cfg.loop.steps is None      # a budget replaces the default steps
    seen = capture(monkeypatch, "run_train_matcher")
    result = CliRunner().invoke(cli.main, ["train-matcher", "--features", "none", "--hard-negatives", "2"])
    cfg = seen[0][0]
    assert cfg.matcher.features == [] and cfg.run.hard_negatives == 2
    assert "--hard-negatives is now --hard-candidates" in result.output


def test_finetune_from_python_needs_no_options():
    """finetune(FinetuneConfig()) is the command with no options: every default is in the config."""
    cfg = FinetuneConfig()
    cfg.validate()
    assert cfg.loop.steps == 500 and cfg.init == "masked-mixer"
    assert all(field_default(f) is not dataclasses.MISSING for f in dataclasses.fields(FinetuneConfig))


def test_every_command_is_covered():
    """A new command gets its options from a config too (and a line in COMMANDS), or says here why not."""
    own_only = {"bench"}     # passes its arguments to a benchmark script
    assert set(cli.main.commands) - own_only == set(COMMANDS)
