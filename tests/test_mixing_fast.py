"""The blocked triangular product gives the masked mixer's results and gradients."""
import pytest
import torch
from close import assert_close

from mixret.models import ModelConfig, build_model, masked_mixer
from mixret.models.masked_mixer import BLOCKED_MIN_LEN, tril_matmul, use_blocked


def reference(w, x):
    return (w * torch.tril(torch.ones_like(w))) @ x


@pytest.mark.parametrize("L,block", [(70, 16), (64, 16), (5, 16), (33, 1)])
def test_tril_matmul_matches_masked_product(L, block):
    w = torch.randn(L, L, dtype=torch.float64, requires_grad=True)
    x = torch.randn(L, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(L, 6, dtype=torch.float64)
    out = tril_matmul(w, x, block)
    gw, gx = torch.autograd.grad(out, (w, x), g)
    ref = reference(w, x)
    rgw, rgx = torch.autograd.grad(ref, (w, x), g)
    for got, want in ((out, ref), (gw, rgw), (gx, rgx)):  # float64
        assert_close(got, want, rtol=1e-12)
    assert torch.all(gw.triu(1) == 0)  # entries above the diagonal are untouched, as with w * tril


def test_tril_matmul_ignores_entries_above_the_diagonal():
    w, x = torch.randn(40, 40), torch.randn(40, 3)
    poisoned = w + torch.triu(torch.full_like(w, float("nan")), 1)
    torch.testing.assert_close(tril_matmul(poisoned, x, 16), tril_matmul(w, x, 16))


def test_tril_matmul_under_autocast():
    w = torch.randn(50, 50, requires_grad=True)
    x = torch.randn(50, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tril_matmul(w, x, 16)
        ref = reference(w, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), rtol=0.02)  # bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.all(w.grad.triu(1) == 0)


@pytest.mark.parametrize("variant", [{}, {"mixer_expand": True}])
def test_model_forward_and_gradients_unchanged(variant, monkeypatch):
    """A flat / expanded mixer on an input long enough for the blocked product, against the einsum path."""
    L = BLOCKED_MIN_LEN + 88  # three blocks, the last one partial
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="masked-mixer", vocab_size=50, d_model=8, n_layers=2, context=L, **variant))
    ids = torch.randint(0, 50, (2, L))
    assert use_blocked(torch.zeros(2, L, 8))

    def run():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_logits, fast_grads = run()
    monkeypatch.setattr(masked_mixer, "BLOCKED_MIN_LEN", 10 ** 9)
    assert not use_blocked(torch.zeros(2, L, 8))
    ref_logits, ref_grads = run()
    assert_close(fast_logits, ref_logits)
    scale = max(float(g.abs().max()) for g in ref_grads.values())  # some gradients are zero up to rounding
    for name, grad in ref_grads.items():
        assert_close(fast_grads[name], grad, scale=scale, name=name)


def test_cached_steps_match_blocked_forward():
    L = BLOCKED_MIN_LEN + 8
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="masked-mixer", vocab_size=50, d_model=8, n_layers=2, context=L)).eval()
    ids = torch.randint(0, 50, (2, L))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        stepped = torch.cat([model.step(ids[:, :L - 4], cache)] +
                            [model.step(ids[:, t:t + 1], cache) for t in range(L - 4, L)], dim=1)
    assert_close(stepped, full)
