"""Text generation from a causal LM: greedy or sampled (temperature, top-k, top-p), with cached decoding.

The prompt is run once through `model.step` (prefill), then each new token is one more `step` that reuses the
cache (see `CausalLM.new_cache`), instead of recomputing the whole prefix. Prompts are `[bos] + encode(text)`
with no trailing end-of-text, as in pretraining. Rows of a batch share the prompt length. Generation stops:
- per row at the end-of-text token; a finished row is padded with end-of-text until the others finish;
- after max_new_tokens;
- when the sequence reaches the model's context (no architecture here can slide past it): `context_full`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mixret.errors import MixretError
from mixret.options import option


@dataclass
class Sampling:
    """How text is sampled: the defaults of `generate`, `generate_text`, `CausalLM.generate` and `mixret generate`."""
    max_new_tokens: int = option(128, "Most tokens to add.")
    temperature: float = option(0.8, "Sampling temperature; 0 = greedy.")
    top_k: int | None = option(40, "Sample from the k most likely tokens; 0 = off.")
    top_p: float | None = option(0.9, "Nucleus sampling mass; 1 = off.")


SAMPLING = Sampling()


@dataclass
class Generation:
    ids: torch.Tensor   # [B, P + n]: the prompt followed by n new tokens (finished rows padded with eos)
    prompt_len: int     # P
    context_full: bool  # stopped early because the sequence filled the model's context


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """[B, V] -> [B, V] with -inf outside the top_k largest (ties kept) and outside the smallest set of the
    most likely tokens whose probability reaches top_p (nucleus). top_k 0/None and top_p 1/None disable."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                       # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits of the next token -> [B] token ids; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise MixretError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise MixretError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise MixretError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MixretError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode without gradients, then restore the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = SAMPLING.max_new_tokens,
             temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
             top_p: float | None = SAMPLING.top_p, *, generator: torch.Generator | None = None,
             eos_id: int | None = None, use_cache: bool = True) -> Generation:
    """Continue each row of input_ids [B, P] by up to max_new_tokens tokens.

    eos_id: the end-of-text id (default: model.tokenizer's, if attached; None without one: never stop early).
    use_cache=False recomputes the full forward pass at every step (the reference for the cached path).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MixretError(f"input_ids must be [batch, prompt length] with at least one token (the bos), "
                          f"got shape {tuple(input_ids.shape)}")
    context = model.config.context
    B, P = input_ids.shape
    if P >= context:
        raise MixretError(f"the prompt has {P} tokens but the model's context is {context}: no room to generate")
    if eos_id is None and getattr(model, "tokenizer", None) is not None:
        eos_id = model.tokenizer.eos_id
    ids = input_ids.to(model.wte.weight.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    with eval_mode(model):
        cache = model.new_cache(B) if use_cache else None
        fresh = ids  # tokens the cache has not seen yet
        while ids.shape[1] - P < max_new_tokens and not done.all():
            if ids.shape[1] >= context:
                return Generation(ids, P, context_full=True)
            logits = model.step(fresh, cache)[:, -1] if use_cache else model(ids).logits[:, -1]  # [B, V]
            token = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            fresh = token[:, None]
            ids = torch.cat([ids, fresh], dim=1)
    return Generation(ids, P, context_full=False)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """[bos] + the prompt's tokens, no trailing end-of-text."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


def decode_row(tokenizer, row: torch.Tensor, prompt_len: int) -> str:
    """Prompt plus continuation as text, cut at the first end-of-text after the prompt."""
    row = row.tolist()
    new = row[prompt_len:]
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    return tokenizer.decode(row[:prompt_len] + new)


def generate_text(model, prompt: str, tokenizer=None, max_new_tokens: int = SAMPLING.max_new_tokens,
                  temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
                  top_p: float | None = SAMPLING.top_p, seed: int | None = None) -> tuple[str, Generation]:
    """Continue one text prompt; returns the decoded prompt + continuation and the raw Generation."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise MixretError("the model has no tokenizer (tokenizer.json next to the weights); pass one")
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    input_ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    out = generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, generator=generator,
                   eos_id=tokenizer.eos_id)
    return decode_row(tokenizer, out.ids[0], out.prompt_len), out


def sample_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 48, seed: int = 0) -> str:
    """A short seeded sample (temperature 0.8, top-k 40, top-p 0.9), e.g. to print at each evaluation."""
    return generate_text(model, prompt, tokenizer, max_new_tokens, seed=seed)[0]
