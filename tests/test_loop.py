"""The shared training loop: the matcher's checkpoints and SIGTERM safety, budgets, world-size changes,
and model options declared once."""
import dataclasses
import json
import textwrap
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from interrupt import python_script, sigterm_after
from safetensors.torch import load_file

from mixret import cli
from mixret.cli import main
from mixret.models.config import ModelConfig, model_options
from mixret.models.matcher import MatcherConfig
from mixret.options import option
from mixret.training import checkpoint
from mixret.training.loop import Task
from mixret.training.matcher import train_matcher
from mixret.training.pretrain import TrainConfig, pretrain

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def synthetic(n=900, dim=16, seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(n, dim))
    return (q + 3).astype(np.float32), (q + 0.5 * r.normal(size=(n, dim)) - 2).astype(np.float32)


MATCHER = dict(epochs=12, batch_size=64, lr=2e-3, seed=0)


def matcher_config():
    return MatcherConfig(emb_dim=16, d_model=32, n_layers=1, context=8, dropout=0.1)


def weights(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


# --- the matcher gains checkpoints, stop_after, resume and SIGTERM safety -----------------------------

def test_matcher_sigterm_and_resume_give_the_weights_of_an_uninterrupted_run(tmp_path):
    q, t = synthetic()
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "t.npy", t)
    run = tmp_path / "run"
    # a slow run in a subprocess (each step sleeps), stopped by SIGTERM once two epochs are logged
    script = textwrap.dedent(f"""
        import time, numpy as np
        from mixret.training import matcher
        from mixret.training.matcher import MatcherConfig, train_matcher
        slow = matcher.MatcherTask.on_step
        matcher.MatcherTask.on_step = lambda self, step, loss: (time.sleep(0.05), slow(self, step, loss))
        q, t = np.load({str(tmp_path / 'q.npy')!r}), np.load({str(tmp_path / 't.npy')!r})
        cfg = MatcherConfig(emb_dim=16, d_model=32, n_layers=1, context=8, dropout=0.1)
        train_matcher(q[100:], t[100:], q[:100], t[:100], cfg, out_dir={str(run)!r}, progress=False, **{MATCHER!r})
    """)
    returncode, err = sigterm_after(python_script(script), run)
    assert returncode != 0 and "stopped by SIGTERM" in err, err
    last = checkpoint.latest_checkpoint(run)
    stopped_at = int(last.name.split("-")[1])
    assert 26 <= stopped_at < 12 * 13 and not (run / "model.safetensors").exists()

    resumed, metrics = train_matcher(q[100:], t[100:], q[:100], t[:100], matcher_config(), out_dir=run,
                                     progress=False, resume=True, **MATCHER)
    straight, straight_metrics = train_matcher(q[100:], t[100:], q[:100], t[:100], matcher_config(),
                                               out_dir=tmp_path / "straight", progress=False, **MATCHER)
    a, b = weights(run), weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * float(b[k].abs().max()) + 1e-12)
    assert metrics["test"] == pytest.approx(straight_metrics["test"], rel=1e-4)
    assert straight_metrics["test"]["top1"] > 0.8  # it learned, so the comparison means something
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [13 * e for e in range(1, 13)]


def test_matcher_stop_after_then_resume(tmp_path):
    q, t = synthetic()
    opts = dict(MATCHER, epochs=3)
    _, m = train_matcher(q[100:], t[100:], q[:100], t[:100], matcher_config(), out_dir=tmp_path / "run",
                         progress=False, stop_after=5, **opts)
    assert m["checkpoint"].endswith("step-000005") and not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(Exception, match="already holds"):  # an unfinished run is not replaced silently
        train_matcher(q[100:], t[100:], q[:100], t[:100], matcher_config(), out_dir=tmp_path / "run",
                      progress=False, **opts)
    _, m = train_matcher(q[100:], t[100:], q[:100], t[:100], matcher_config(), out_dir=tmp_path / "run",
                         progress=False, resume=True, **opts)
    assert m["steps"] == 39 and (tmp_path / "run" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 39


# --- budget_minutes ---------------------------------------------------------------------------------

def write_corpus(path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(n)) + "\n")
    return path


def test_budget_minutes_sets_the_steps_and_leaves_the_run_as_with_those_steps(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    opts = dict(data=[str(corpus)], tokenizer="bytes", d_model=32, layers=2, context=32, batch_size=4,
                eval_every=5, log_every=1, dropout=0.1)
    out = pretrain(TrainConfig(budget_minutes=0.05, out=str(tmp_path / "budget"), **opts))
    saved = json.loads((out / "train_config.json").read_text())
    steps = saved["steps"]
    assert steps >= 1 and saved["budget_minutes"] is None
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps
    again = pretrain(TrainConfig(steps=steps, out=str(tmp_path / "steps"), **opts))
    a, b = weights(out), weights(again)
    for k in a:  # timing real steps changed neither the weights nor the random stream
        assert torch.equal(a[k], b[k]), k
    result = CliRunner().invoke(main, ["pretrain", "--budget-minutes", "1", "--steps", "3",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "either steps or epochs or budget_minutes" in result.output


class SleepyTask(Task):
    """A task whose step takes `UNIT` seconds times the step's cost; the steps the budget times cost 3, the rest 1
    (so the mean step costs about 1). With slow_start, the first steps of the process also take 5 times longer
    than their cost says, as a fresh process's first real steps do."""
    name, unit, fingerprint, UNIT = "sleepy", "items", "sleepy", 0.02

    def __init__(self, declare_costs: bool, slow_start: int = 0):
        self.objective = Sleepy()
        self.slow_start = slow_start
        if declare_costs:
            self.relative_cost = self.cost

    def cost(self, step: int) -> float:
        from mixret.training.loop import BUDGET_TIMED_STEPS, BUDGET_WARMUP_STEPS
        return 3.0 if BUDGET_WARMUP_STEPS <= step < BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS else 1.0

    def batches(self, start, dist, grad_accum):
        step = start
        while True:
            slow = 5.0 if self.slow_start > 0 else 1.0
            self.slow_start -= 1
            yield [self.UNIT * self.cost(step) * slow]
            step += 1

    def evaluate(self):
        return {}

    def save(self, directory):
        pass

    def load(self, directory):
        pass


class Sleepy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, seconds):
        import time
        time.sleep(seconds)
        return (self.w * 0).sum() + 1.0, 1


def test_budget_timing_divides_by_the_cost_of_the_steps_it_timed():
    from mixret.distributed import Distributed
    from mixret.training.loop import LoopConfig, _Loop
    seconds = 1.2          # 60 steps of cost 1, or 20 if the timed steps (cost 3) were taken as typical
    planned = {}
    for declare in (True, False):
        cfg = LoopConfig(budget_minutes=seconds / 60, eval_every=10**9, progress=False)
        planned[declare] = _Loop(SleepyTask(declare), cfg, Distributed(), None, "fresh", 0).cfg.steps
    assert 45 <= planned[True] <= 62, planned
    assert 15 <= planned[False] <= 21, planned


def test_budget_timing_leaves_out_a_fresh_process_first_steps():
    """Four slow first steps (as a fresh process runs them; a number of this machine, not of the loop's
    constants) do not shorten the planned run: with them timed it would be 20 steps instead of 60."""
    from mixret.distributed import Distributed
    from mixret.training.loop import LoopConfig, _Loop
    seconds = 1.2          # 60 steps of cost 1; far fewer if the slow first steps were timed
    cfg = LoopConfig(budget_minutes=seconds / 60, eval_every=10**9, progress=False)
    planned = _Loop(SleepyTask(True, slow_start=4), cfg, Distributed(), None, "fresh", 0).cfg.steps
    assert 45 <= planned <= 62, planned


def test_finetune_step_costs_average_one_and_follow_the_padded_tokens(tmp_path):
    from planted import planted_pairs

    from mixret.data import write_pairs_jsonl
    from mixret.distributed import Distributed
    from mixret.models import ModelConfig
    from mixret.training.finetune import FinetuneConfig, FinetuneTask
    from mixret.training.loop import LoopConfig
    pairs = planted_pairs(200, n_words=30)
    pairs = [dataclasses.replace(p, target=p.target + " filler" * (i % 7) * 5) for i, p in enumerate(pairs)]
    write_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")
    cfg = FinetuneConfig(pairs=str(tmp_path / "pairs.jsonl"), test_fraction=0.0, val_pairs=20, tokenizer="bytes",
                         out=str(tmp_path / "ft"),
                         model=ModelConfig(d_model=16, n_layers=1, context=64), batch_size=8,
                         loop=LoopConfig(steps=10))
    task = FinetuneTask(cfg, Distributed())
    costs = np.array([task.relative_cost(s) for s in range(task.per_epoch)])
    assert costs.mean() == pytest.approx(1.0) and costs.max() > 1.3 * costs.min()
    batches = task.batches(0, Distributed(), 1)
    padded = [sum(t.numel() for t in mb[0][:4:2]) for mb in (next(batches) for _ in range(task.per_epoch))]
    # measured after token dropout, so only roughly the same tokens: the order of the steps must agree
    assert np.corrcoef(costs, padded)[0, 1] > 0.9


# --- resuming with another number of processes ------------------------------------------------------

def test_resume_after_a_change_of_world_size_warns(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    opts = dict(data=[str(corpus)], tokenizer="bytes", d_model=32, layers=2, context=32, batch_size=4, steps=4,
                dropout=0.1, out=str(tmp_path / "run"))
    stopped = pretrain(TrainConfig(stop_after=2, **opts))
    # make the checkpoint look written by 2 processes, as torchrun would
    state = json.loads((stopped / "state.json").read_text())
    state["world_size"] = 2
    (stopped / "state.json").write_text(json.dumps(state))
    rng = load_file(str(stopped / "rng.safetensors"))
    from safetensors.torch import save_file
    rank1 = {k.replace("rank0", "rank1"): v.clone() for k, v in rng.items()}
    save_file({**rng, **rank1}, str(stopped / "rng.safetensors"))
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), resumed by 1.*random draws"):
        pretrain(TrainConfig(resume=True, **opts))


# --- model options are declared once, in ModelConfig -------------------------------------------------

def test_every_model_field_is_a_pretrain_option():
    params = {p.name for p in main.commands["pretrain"].params}
    for name in model_options():
        assert name in params, name
    assert "n_layers" not in params and "layers" in params and "vocab_size" in params  # the BPE size


def test_a_new_model_field_appears_in_pretrain_help():
    """A field added to ModelConfig becomes an option through the same generator every command uses."""
    @dataclasses.dataclass
    class Extended(ModelConfig):
        attn_window: int = option(7, "a brand-new model option")

    @click.command()
    @cli.config_options(Extended)
    def command(**options):
        click.echo(json.dumps(options))

    result = CliRunner().invoke(command, ["--help"], terminal_width=200)
    assert "--attn-window" in result.output and "a brand-new model option" in result.output
    assert "[default: 7]" in result.output
    assert "--layers" in result.output and "--d-model" in result.output
    result = CliRunner().invoke(command, ["--attn-window", "9"])
    assert json.loads(result.output)["attn_window"] == 9


def test_last_metric_reads_the_last_logged_value(tmp_path):
    from mixret.training.loop import last_metric
    assert last_metric(tmp_path, "val_r1") is None                     # no metrics.jsonl yet
    lines = [{"step": 1, "val_r1": None}, {"step": 2, "val_r1": 0.4}, {"step": 3, "val_r1": 0.6},
             {"step": 4, "val_r1": None, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert last_metric(tmp_path, "val_r1") == 0.6 and last_metric(tmp_path, "loss") == 1.0
    assert last_metric(tmp_path, "val_loss") is None
