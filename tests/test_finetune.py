"""Contrastive fine-tuning: a planted-signal corpus it must solve with either pooling, SIGTERM + resume equal
to an uninterrupted run, the fusion weight fitted on validation pairs only, and the running-mean init."""
import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from interrupt import python_script, sigterm_after
from planted import planted_pairs
from safetensors.torch import load_file

import mixret
from mixret.cli import main
from mixret.data import Pair, load_pairs, split_pairs, write_pairs_jsonl
from mixret.errors import MixretError
from mixret.models import ModelConfig, build_model
from mixret.retrieval.evaluate import evaluate_pairs
from mixret.training.finetune import FinetuneConfig, drop_tokens, epoch_batches, finetune, validation_slice
from mixret.training.loop import LoopConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def tiny(pooling="last", **loop) -> dict:
    return dict(init="masked-mixer", val_pairs=32, vocab_size=300, batch_size=16,
                model=ModelConfig(d_model=64, n_layers=2, context=32, mixing_init="mean"), pooling=pooling,
                loop=LoopConfig(**{"steps": 200, "lr": 3e-3, "weight_decay": 0.01, "eval_every": 100,
                                   "checkpoint_every": 1000, "progress": False, **loop}))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_finetune_solves_a_planted_corpus_with_either_pooling(tmp_path, pooling):
    path = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(), path)
    out = finetune(FinetuneConfig(pairs=str(path), test_fraction=0.2, out=str(tmp_path / "ft"), **tiny(pooling)))
    model = mixret.load(out)
    assert model.embedding_defaults["pooling"] == pooling        # recorded: encode uses it untold
    test = split_pairs(load_pairs(path), 0.2)[1]
    assert len(test) > 40
    report = evaluate_pairs(test, model=model, modes="vector")
    assert report["modes"]["vector"]["R@1"] > 0.9
    # the same model before training is far from that: the signal is learned, not given by the init
    untrained = build_model(dataclasses.replace(model.config))
    untrained.tokenizer = model.tokenizer
    assert evaluate_pairs(test, model=untrained, modes="vector", pooling=pooling)["modes"]["vector"]["R@1"] < 0.7
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_r1"] > 0.9 and metrics[0]["loss"] > metrics[-1]["loss"]


def test_finetune_sigterm_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(), path)
    # token dropout on: its draws must also continue where they stopped
    options = dict(pairs=str(path), test_fraction=0.2, token_dropout=0.1,
                   **tiny(steps=60, eval_every=20, checkpoint_every=1000))
    whole = finetune(FinetuneConfig(out=str(tmp_path / "whole"), **options))

    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import time
        from mixret.training import finetune as ft
        from mixret.training.finetune import FinetuneConfig, finetune
        from mixret.training.loop import LoopConfig
        from mixret.models import ModelConfig
        slow = ft.FinetuneTask.micro_batch
        ft.FinetuneTask.micro_batch = lambda self, *a: (time.sleep(0.05), slow(self, *a))[1]
        finetune(FinetuneConfig(out={str(run)!r}, pairs={str(path)!r}, test_fraction=0.2, init="masked-mixer",
                                val_pairs=32, vocab_size=300, batch_size=16, token_dropout=0.1,
                                model=ModelConfig(d_model=64, n_layers=2, context=32, mixing_init="mean"),
                                loop=LoopConfig(steps=60, lr=3e-3, weight_decay=0.01, eval_every=20,
                                                checkpoint_every=1000, progress=False)))
    """)
    returncode, err = sigterm_after(python_script(script), run, env={"MIXRET_CACHE": str(tmp_path / "cache")})
    assert returncode != 0 and "checkpoint" in err
    assert not (run / "model.safetensors").exists()              # nothing that looks finished
    resumed = finetune(FinetuneConfig(out=str(run), resume=True, **options))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * max(1.0, float(a[k].abs().max())))
    assert json.loads((whole / "fusion.json").read_text()) == json.loads((resumed / "fusion.json").read_text())


def test_fusion_weight_is_fitted_on_validation_pairs_saved_and_reloaded(tmp_path):
    pairs = planted_pairs()
    path_a, path_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_pairs_jsonl(pairs, path_a)
    # the same file with every test pair's texts replaced: a weight fitted on test pairs would change
    train_ids = {p.id for p in split_pairs(pairs, 0.2)[0]}
    write_pairs_jsonl([p if p.id in train_ids else Pair(p.id, "zzz " + p.query[::-1], p.target[::-1])
                       for p in pairs], path_b)
    outs = [finetune(FinetuneConfig(pairs=str(path), test_fraction=0.2, out=str(tmp_path / path.stem),
                                    **tiny(steps=30, eval_every=30))) for path in (path_a, path_b)]
    saved = [json.loads((out / "fusion.json").read_text()) for out in outs]
    on_disk = json.loads((outs[0] / "fusion.json").read_text())
    for s in saved:
        s["fitted"].pop("on")                                     # names the pairs file
    assert saved[0] == saved[1]
    fitted = saved[0]["fitted"]
    assert fitted["pairs"] == 32
    assert saved[0]["weight"] == fitted["grid"][int(np.argmax(fitted["mrr@10"]))]   # the best of its grid
    # `evaluate` picks the saved fusion up from the model folder, with no weight given
    res = CliRunner().invoke(main, ["evaluate", "--pairs", str(path_a), "--model", str(outs[0]), "--mode",
                                    "fusion", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["fusion"] == on_disk and report["modes"]["fusion"]["R@1"] > 0


def test_validation_slice_depends_on_ids_only_and_batches_on_seed_and_epoch():
    pairs = planted_pairs(100)
    train, val = validation_slice(pairs, 10)
    train2, val2 = validation_slice(list(reversed(pairs)), 10)
    assert {p.id for p in val} == {p.id for p in val2} and len(train) == 90
    with pytest.raises(MixretError, match="too few"):
        validation_slice(pairs[:11], 10)
    with pytest.raises(MixretError, match="too few"):
        validation_slice(pairs[:9], 1)
    lengths = np.arange(100) % 7
    a = epoch_batches(lengths, 8, seed=0, epoch=3)
    np.testing.assert_array_equal(a, epoch_batches(lengths, 8, seed=0, epoch=3))
    assert not np.array_equal(a, epoch_batches(lengths, 8, seed=0, epoch=4))
    assert len(np.unique(a)) == a.size == 96                     # each pair at most once per epoch


def test_finetune_cli_refuses_model_options_for_a_folder_and_runs_from_an_arch(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(120), path)
    common = ["finetune", "--pairs", str(path), "--val-pairs", "16", "--vocab-size", "300", "--batch-size", "16"]
    res = CliRunner().invoke(main, common + ["--model", "masked-mixer", "--d-model", "32", "--layers", "1",
                                             "--context", "32", "--steps", "4", "--eval-every", "2",
                                             "--out", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    assert "model written to" in res.output and (tmp_path / "ft" / "fusion.json").is_file()
    res = CliRunner().invoke(main, common + ["--model", str(tmp_path / "ft"), "--d-model", "64", "--steps", "2",
                                             "--out", str(tmp_path / "ft2")])
    assert res.exit_code == 1 and "its own options stay" in res.output


# --- the running-mean mixing init ---------------------------------------------------------------

def _mixing(arch, **kw):
    extra = {"hypermixer": {"hyper_dim": 8}, "llama": {"n_heads": 2}}.get(arch, {})
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=50, d_model=16, n_layers=1, context=64, mixing_init="mean",
                      **extra, **kw)
    return build_model(cfg).blocks[0].mix


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("hypermixer", {}), ("hypermixer", {"hyper_tied": True})])
def test_mean_init_makes_the_mixing_a_running_mean_exactly(arch, kw):
    mix = _mixing(arch, **kw)
    x = torch.randn(3, 64, 16)
    mean = x.cumsum(1) / torch.arange(1, 65).view(1, 64, 1)
    with torch.no_grad():
        expected = mix.proj(F.linear(mean, mix.qkv.weight[32:])) if arch == "llama" else mix.proj(mean)
        torch.testing.assert_close(mix(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("kw", [{}, {"mixer_heads": 2}, {"mixer_kernel": 3}, {"mixer_expand": True}])
def test_mean_init_makes_masked_mixing_a_running_mean_up_to_noise(kw):
    mix = _mixing("masked-mixer", **kw)
    x = torch.randn(3, 64, 16)
    mean = x.cumsum(1) / torch.arange(1, 65).view(1, 64, 1)
    expected = F.gelu(mean) if kw.get("mixer_expand") else mean      # expanded: mean, GELU, identity
    with torch.no_grad():
        err = (mix(x) - expected).abs().max() / expected.abs().max()
    assert err < 0.1
    assert not mix.mats.bias.detach().any()
    # the default init is far from it: the last position is noise around zero, not the mean
    torch.manual_seed(0)
    rand = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=1, context=64, **kw)).blocks[0].mix
    with torch.no_grad():
        assert (rand(x) - expected).abs().max() / expected.abs().max() > 0.5


def test_drop_tokens_keeps_bos_and_eos_and_drops_about_the_fraction():
    seq = [1] + list(range(10, 1010)) + [2]
    a = drop_tokens(seq, 0.2, np.random.default_rng(0), keep_last=True)
    assert a[0] == 1 and a[-1] == 2 and set(a) <= set(seq)
    assert a[1:-1] == sorted(set(a[1:-1]))                                     # order kept, nothing repeated
    assert 0.75 < (len(a) - 2) / 1000 < 0.85
    assert a == drop_tokens(seq, 0.2, np.random.default_rng(0), keep_last=True)   # a draw is reproducible
    assert drop_tokens(seq, 0.0, np.random.default_rng(0), keep_last=False) == seq
    assert drop_tokens([1, 5], 0.99, np.random.default_rng(0), keep_last=False) == [1, 5]  # a token always stays


def test_finetune_with_bm25_hard_negatives_solves_a_planted_corpus(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(), path)
    cfg = FinetuneConfig(pairs=str(path), test_fraction=0.2, out=str(tmp_path / "ft"), hard_negatives="bm25",
                         **tiny(steps=120))
    out = finetune(cfg)
    test = split_pairs(load_pairs(path), 0.2)[1]
    assert evaluate_pairs(test, model=mixret.load(out), modes="vector")["modes"]["vector"]["R@1"] > 0.9


def clm_checkpoint(tmp_path, pairs, arch="masked-mixer") -> Path:
    """A small model pretrained on the pairs' texts with `pretrain`'s defaults (next-token prediction): its last
    position predicts the next token, which is what made contrastive fine-tuning collapse."""
    from mixret.training.pretrain import TrainConfig, pretrain
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for p in pairs for t in (p.query, p.target)))
    return pretrain(TrainConfig(data=[str(texts)], arch=arch, tokenizer="bytes", d_model=64, layers=2, context=64,
                                steps=150, eval_every=1000, out=str(tmp_path / "clm")))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_clm_checkpoint_fine_tunes_as_well_as_random_init(tmp_path, pooling):
    path = tmp_path / "pairs.jsonl"
    pairs = planted_pairs()
    write_pairs_jsonl(pairs, path)
    clm = clm_checkpoint(tmp_path, pairs)
    test = split_pairs(load_pairs(path), 0.2)[1]
    opts = tiny(pooling, steps=250, log_every=5, eval_every=250)
    results = {}
    for start in ("clm", "random"):
        init = {"init": str(clm)} if start == "clm" else {"model": dataclasses.replace(opts["model"], context=64)}
        out = finetune(FinetuneConfig(pairs=str(path), test_fraction=0.2, out=str(tmp_path / f"ft-{start}"),
                                      tokenizer="bytes", **{**opts, **init}))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[start] = (metrics, evaluate_pairs(test, model=mixret.load(out), modes="vector")["modes"]["vector"])
    metrics, clm_test = results["clm"]
    chance = np.log(16)   # batch_size 16
    # the loss leaves chance within the first 30 steps and does not come back to it (a collapse sits at ln 16)
    assert min(m["loss"] for m in metrics if m["step"] <= 30) < chance - 0.3
    assert metrics[-1]["loss"] < chance - 1.0 and metrics[-1]["val_mean_cos"] < 0.9
    # and ends where random init ends, on the held-out pairs
    random_test = results["random"][1]
    assert clm_test["R@1"] > 0.8 and clm_test["R@1"] >= random_test["R@1"] - 0.05
