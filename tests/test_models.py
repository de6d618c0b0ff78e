import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from close import assert_close
from reference import hypermix_naive, hypermix_recurrent
from zoo import CONFIGS, TINY, make

import mixret
from mixret.cli import main
from mixret.errors import MixretError
from mixret.models import VARIANTS, ModelConfig, build_model, load
from mixret.models.hypermixer import hypermix
from mixret.tokenizer import ByteTokenizer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality_exact(name):
    model = make(name)
    for L in (5, 17, 24):
        ids = torch.randint(0, 64, (2, L))
        out = model(ids)
        for t in sorted({0, 1, L // 2, L - 1}):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % 64
            out2 = model(changed)
            assert torch.equal(out.logits[:, :t], out2.logits[:, :t]), (name, L, t)
            assert torch.equal(out.hidden_states[:, :t], out2.hidden_states[:, :t]), (name, L, t)
            # and the change is visible at t itself, so the check is not vacuous
            assert not torch.equal(out.hidden_states[:, t], out2.hidden_states[:, t])


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n]["arch"] == "masked-mixer"])
def test_short_input_equals_prefix_of_full_context(name):
    model = make(name)
    ids = torch.randint(0, 64, (3, TINY["context"]))
    full = model(ids).hidden_states
    for L in (1, 7, 23):
        assert_close(model(ids[:, :L]).hidden_states, full[:, :L])


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n]["arch"] == "masked-mixer"])
def test_masked_entries_get_zero_gradient(name):
    model = make(name).train()
    ids = torch.randint(0, 64, (2, TINY["context"]))
    # a loss on every position's output (the LM loss ignores the last position's prediction)
    model(ids).hidden_states.pow(3).sum().backward()
    tril = torch.tril(torch.ones(TINY["context"], TINY["context"], dtype=torch.bool))
    for block in model.blocks:
        grad = block.mix.mats.weight.grad            # [n, C, C]
        assert torch.all(grad[:, ~tril] == 0)
        assert torch.all(grad[:, tril] != 0)


def _hyper_inputs(B=2, L=37, H=2, K=5, E=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, L, H, K, generator=g), torch.randn(B, L, H, K, generator=g),
            torch.randn(B, L, H, E, generator=g))


@pytest.mark.parametrize("chunk", [1, 4, 16, 37, 64])
def test_hypermix_chunked_equals_recurrent_and_naive(chunk):
    w1, w2, x = _hyper_inputs()
    y = hypermix(w1, w2, x, chunk)
    assert_close(y, hypermix_recurrent(w1, w2, x))
    assert_close(y, hypermix_naive(w1, w2, x))
    # a prefix of length L gives the first L positions of the longer input
    for L in (1, 9, 20):
        assert_close(hypermix(w1[:, :L], w2[:, :L], x[:, :L], chunk), y[:, :L])


def test_hypermix_checkpointed_gradients_match():
    w1, w2, x = (t.requires_grad_() for t in _hyper_inputs())
    hypermix(w1, w2, x, 8, use_checkpoint=True).square().sum().backward()
    g1 = [t.grad.clone() for t in (w1, w2, x)]
    for t in (w1, w2, x):
        t.grad = None
    hypermix_naive(w1, w2, x).square().sum().backward()
    for a, t in zip(g1, (w1, w2, x)):
        assert_close(a, t.grad)


def test_hypermixer_model_prefix_property():
    model = make("hypermixer (2 heads, tied, chunk 5)")
    ids = torch.randint(0, 64, (2, 24))
    full = model(ids).hidden_states
    for L in (3, 11):
        assert_close(model(ids[:, :L]).hidden_states, full[:, :L])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_embed_right_padded_batch_equals_each_alone(name):
    model = make(name)
    lengths = [3, 11, 7]
    seqs = [torch.randint(1, 64, (n,)) for n in lengths]
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    batch = model.embed(ids, mask)
    for i, s in enumerate(seqs):
        alone = model.embed(s[None], torch.ones(1, len(s), dtype=torch.long))[0]
        assert_close(batch[i], alone)
        assert_close(batch[i], model(ids).hidden_states[i, len(s) - 1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_without_pickle(name, tmp_path, monkeypatch):
    model = make(name)
    model.save_pretrained(tmp_path, tokenizer=ByteTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]

    def no_pickle(*a, **k):
        raise AssertionError("loading must not unpickle")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = mixret.load(tmp_path)
    ids = torch.randint(0, 64, (2, 13))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert isinstance(loaded.tokenizer, ByteTokenizer)


def test_tied_embeddings_stay_tied_after_load(tmp_path):
    model = make("masked-mixer (tied)")
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()


def test_load_errors_name_the_file(tmp_path):
    model = make("masked-mixer (flat)")
    with pytest.raises(MixretError, match="model directory not found"):
        load(tmp_path / "nope")
    d = tmp_path / "m"
    model.save_pretrained(d, tokenizer=ByteTokenizer())
    (d / "model.safetensors").rename(tmp_path / "w")
    with pytest.raises(MixretError, match="model.safetensors"):
        load(d)
    (tmp_path / "w").rename(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_model": 48}))
    with pytest.raises(MixretError, match=r"model.safetensors.*shape"):
        load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100, "n_layers": 3}))
    with pytest.raises(MixretError, match=r"model.safetensors.*missing tensors"):
        load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "colour": "red"}))
    with pytest.raises(MixretError, match=r"config.json.*colour"):
        load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(MixretError, match=r"config.json.*not valid JSON"):
        load(d)
    (d / "config.json").unlink()
    with pytest.raises(MixretError, match="config.json"):
        load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    assert load(d).tokenizer.vocab_size == 259
    small = tmp_path / "small"
    build_model(ModelConfig(**{**TINY, "vocab_size": 64})).save_pretrained(small)
    ByteTokenizer().save(small / "tokenizer.json")  # 259 tokens for a 64-token model
    with pytest.raises(MixretError, match="tokenizer.json"):
        load(small)
    with pytest.raises(MixretError, match="vocab_size"):
        build_model(ModelConfig(**{**TINY, "vocab_size": 64})).save_pretrained(small, tokenizer=ByteTokenizer())


def test_config_rejects_bad_options():
    with pytest.raises(MixretError, match="unknown arch"):
        ModelConfig(arch="rnn")
    with pytest.raises(MixretError, match="mixer_heads applies to arch 'masked-mixer'"):
        ModelConfig(arch="llama", mixer_heads=4)
    with pytest.raises(MixretError, match="divisible"):
        ModelConfig(arch="masked-mixer", d_model=30, mixer_heads=4)
    with pytest.raises(MixretError, match="exceeds the model's context"):
        make("llama")(torch.zeros(1, 25, dtype=torch.long))


def test_models_command_prints_parameter_counts():
    res = CliRunner().invoke(main, ["models", "--d-model", "32", "--layers", "2", "--context", "24",
                                    "--vocab-size", "260"])
    assert res.exit_code == 0, res.output
    for name, v in VARIANTS.items():
        n = build_model(ModelConfig(**{**TINY, **v})).num_params()
        line = next(l for l in res.output.splitlines() if l.startswith(f"| {name} |"))
        assert f"{n:,}" in line


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, **VARIANTS[name]})).train()
    ids = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, (name, step, loss.item())


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n]["arch"] == "masked-mixer"])
def test_every_mixing_parameter_is_used(name):
    """Each mixing matrix and each bias row moves the mixer's output: no dead parameters (a kernel-k mixer
    once created k bias rows and used only the first)."""
    model = make(name).train()
    C = TINY["context"]
    tril = torch.tril(torch.ones(C, C, dtype=torch.bool))
    for block in model.blocks:
        mix = block.mix
        (mix(torch.randn(2, C, TINY["d_model"])) * torch.randn(2, C, TINY["d_model"])).sum().backward()
        assert torch.all(mix.mats.weight.grad[:, tril] != 0)
        assert torch.all(mix.mats.bias.grad != 0), name


def test_kernel_mixer_adds_only_its_extra_matrices():
    """kernel k = the flat mixer plus k-1 mixing matrices per layer; one bias, as the k products are summed."""
    C, L, k = TINY["context"], TINY["n_layers"], 4
    flat = build_model(ModelConfig(**TINY, arch="masked-mixer"))
    kernel = build_model(ModelConfig(**TINY, arch="masked-mixer", mixer_kernel=k))
    assert kernel.num_params() - flat.num_params() == L * (k - 1) * C * C
    assert tuple(kernel.blocks[0].mix.mats.bias.shape) == (1, C)


@pytest.mark.parametrize("name", ["masked-mixer (flat)", "llama"])
def test_embedding_head_starts_as_the_running_mean_and_stays_causal(name, tmp_path):
    model = make(name)
    lengths = [3, 11, 7]
    ids = torch.randint(1, 64, (3, max(lengths)))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    h = model(ids).hidden_states
    assert_close(model.embed(ids, mask), torch.stack([h[i, n - 1] for i, n in enumerate(lengths)]))
    model.add_pool_head()
    emb = model.embed(ids, mask)
    # at the start: the mean of each text's hidden states, positions 0..last (not the last position's state)
    assert_close(emb, torch.stack([h[i, :n].mean(0) for i, n in enumerate(lengths)]))
    # what follows a text's last token (padding, or a longer text) does not change its embedding, once trained
    with torch.no_grad():
        model.pool_head.logits.normal_()
    emb = model.embed(ids, mask)
    longer = ids.clone()
    longer[0, lengths[0]:] = 5
    assert_close(model.embed(longer, mask)[0], emb[0])
    assert not torch.allclose(emb[0], h[0, :lengths[0]].mean(0), atol=1e-3)   # the trained weights are used
    # saved with the model: the config records the head and the weights come back
    model.save_pretrained(tmp_path, tokenizer=ByteTokenizer())
    assert json.loads((tmp_path / "config.json").read_text())["pool_head"] is True
    assert_close(mixret.load(tmp_path).embed(ids, mask), emb)


def test_a_model_saved_without_the_head_field_loads_without_a_head(tmp_path):
    model = make("masked-mixer (flat)")
    model.save_pretrained(tmp_path, tokenizer=ByteTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["pool_head"]                       # as written before the head existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = mixret.load(tmp_path)
    assert loaded.pool_head is None and not loaded.config.pool_head
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(loaded.embed(ids), model.embed(ids))
