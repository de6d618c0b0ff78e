import pytest
import torch
from click.testing import CliRunner
from close import assert_close
from zoo import CONFIGS, TINY, make

import mixret
from mixret.cli import main
from mixret.errors import MixretError
from mixret.models.generate import filter_logits, generate, generate_text, sample_next, sample_text
from mixret.tokenizer import ByteTokenizer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_logits_match_full_forward(name):
    model = make(name)
    ids = torch.randint(0, 256, (3, TINY["context"]))
    with torch.no_grad():
        full = model(ids).logits
        one_by_one = model.new_cache(3)
        stepped = torch.cat([model.step(ids[:, t:t + 1], one_by_one) for t in range(ids.shape[1])], dim=1)
        # a multi-token prefill, single tokens, then a chunk that starts mid-sequence
        chunked = model.new_cache(3)
        pieces = [model.step(ids[:, :7], chunked)] + [model.step(ids[:, t:t + 1], chunked) for t in range(7, 10)]
        pieces.append(model.step(ids[:, 10:], chunked))
    assert_close(stepped, full)
    assert_close(torch.cat(pieces, dim=1), full)
    assert one_by_one.pos == chunked.pos == TINY["context"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_recomputing(name):
    model = make(name)
    prompt = torch.randint(0, 256, (3, 4))
    cached = generate(model, prompt, max_new_tokens=100, temperature=0)
    full = generate(model, prompt, max_new_tokens=100, temperature=0, use_cache=False)
    assert torch.equal(cached.ids, full.ids)
    assert torch.equal(cached.ids[:, :4], prompt)
    assert cached.ids.shape == (3, TINY["context"]) and cached.context_full and full.context_full
    assert len(set(map(tuple, cached.ids[:, 4:].tolist()))) > 1  # rows really continue differently


def test_step_past_context_and_wrong_batch_raise():
    model = make("masked-mixer (flat)")
    cache = model.new_cache(2)
    model.step(torch.zeros(2, 20, dtype=torch.long), cache)
    with pytest.raises(MixretError, match="context 24"):
        model.step(torch.zeros(2, 5, dtype=torch.long), cache)
    with pytest.raises(MixretError, match="made for 2"):
        model.step(torch.zeros(3, 1, dtype=torch.long), cache)


def test_eos_stops_each_row_and_pads_with_eos():
    model = make("masked-mixer (expanded)")
    prompt = torch.randint(0, 256, (3, 3))
    ref = generate(model, prompt, max_new_tokens=12, temperature=0).ids
    eos = int(ref[0, 5])  # a token row 0 emits after two new tokens (perhaps earlier too)
    out = generate(model, prompt, max_new_tokens=12, temperature=0, eos_id=eos)
    assert not out.context_full
    for row, ref_row in zip(out.ids.tolist(), ref.tolist()):
        new, ref_new = row[3:], ref_row[3:]
        stop = ref_new.index(eos) + 1 if eos in ref_new else len(ref_new)
        assert new[:stop] == ref_new[:stop]
        assert all(t == eos for t in new[stop:])


def test_generation_stops_when_all_rows_finish():
    model = make("llama")
    prompt = torch.randint(0, 256, (1, 3))
    ref = generate(model, prompt, max_new_tokens=6, temperature=0).ids
    out = generate(model, prompt, max_new_tokens=6, temperature=0, eos_id=int(ref[0, 4]))
    first = ref[0, 3:].tolist().index(int(ref[0, 4]))
    assert out.ids.shape == (1, 3 + first + 1)


def test_prompt_filling_the_context_is_an_error_and_full_context_warns():
    model = make("hypermixer")
    with pytest.raises(MixretError, match="no room"):
        generate(model, torch.zeros(1, 24, dtype=torch.long), max_new_tokens=1)
    with pytest.warns(UserWarning, match="context of 24"):
        ids = model.generate(torch.zeros(1, 20, dtype=torch.long), max_new_tokens=10, temperature=0)
    assert ids.shape == (1, 24)
    ids = model.generate(torch.zeros(1, 20, dtype=torch.long), max_new_tokens=4, temperature=0)  # fits: no warning
    assert ids.shape == (1, 24)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda out: (out > float("-inf")).squeeze(0).tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, False, True, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, False, True, False]
    assert kept(filter_logits(logits, top_p=0.9)) == [True, False, True, True]
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 4


def test_sampling_respects_filters_and_seed():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.65, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    assert sample_next(logits, 0.0).eq(0).all()
    model = make("masked-mixer (4 heads)")
    prompt = torch.randint(0, 256, (2, 3))
    run = lambda seed: generate(model, prompt, 15, temperature=1.0, top_k=None, top_p=None,
                                generator=torch.Generator().manual_seed(seed)).ids
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_bad_sampling_options_are_errors():
    model = make("masked-mixer (flat)")
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for kwargs, msg in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                        ({"max_new_tokens": -1}, "max_new_tokens")]:
        with pytest.raises(MixretError, match=msg):
            generate(model, prompt, **kwargs)
    with pytest.raises(MixretError, match="prompt length"):
        generate(model, torch.zeros(3, dtype=torch.long))


def test_sample_text_is_seeded_and_keeps_training_mode():
    model = make("masked-mixer (kernel 4)").train()
    tok = ByteTokenizer()
    a = sample_text(model, tok, prompt="Hi", max_new_tokens=8, seed=3)
    assert model.training
    assert a == sample_text(model, tok, prompt="Hi", max_new_tokens=8, seed=3)
    assert a.startswith("Hi") and isinstance(a, str)
    text, out = generate_text(model, "Hi", tok, max_new_tokens=8, seed=3)
    assert text == a and out.ids[0, 0].item() == tok.bos_id and out.ids[0, 1:3].tolist() == tok.encode("Hi")


@pytest.fixture
def saved_model(tmp_path):
    model = make("masked-mixer (flat)")
    model.save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    return tmp_path / "m"


def test_cli_generate(saved_model):
    runner = CliRunner()
    args = ["generate", "Once", "--model", str(saved_model), "--max-new-tokens", "5", "--seed", "3"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("Once")
    assert runner.invoke(main, args).stdout == first.stdout
    greedy = runner.invoke(main, ["generate", "Once", "--model", str(saved_model), "--greedy",
                                  "--max-new-tokens", "5"])
    model = mixret.load(saved_model)
    expected = model.tokenizer.decode(generate(model, torch.tensor([[257, *b"Once"]]), 5, temperature=0).ids[0])
    assert greedy.stdout == expected + "\n"
    full = runner.invoke(main, ["generate", "Once", "--model", str(saved_model), "--max-new-tokens", "100"])
    assert full.exit_code == 0 and "context of 24 tokens is full" in full.stderr


def test_cli_generate_errors(saved_model, tmp_path):
    runner = CliRunner()
    long = runner.invoke(main, ["generate", "x" * 30, "--model", str(saved_model)])
    assert long.exit_code == 1 and "no room" in long.output
    bad = runner.invoke(main, ["generate", "Hi", "--model", str(saved_model), "--top-p", "1.5"])
    assert bad.exit_code == 1 and "top_p" in bad.output
    (saved_model / "tokenizer.json").unlink()
    none = runner.invoke(main, ["generate", "Hi", "--model", str(saved_model)])
    assert none.exit_code == 1 and "tokenizer" in none.output
