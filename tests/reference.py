"""Reference implementations the tests check the package's fast paths against (not part of mixret)."""
import torch
import torch.nn.functional as F


def hypermix_recurrent(w1, w2, x) -> torch.Tensor:
    """Token-by-token form: carry H_t, one position at a time."""
    B, L, H, E = x.shape
    state = x.new_zeros(B, H, w1.shape[-1], E, dtype=torch.float32)
    ys = []
    for t in range(L):
        state = state + w1[:, t].float().unsqueeze(-1) * x[:, t].float().unsqueeze(-2)
        ys.append((w2[:, t].float().unsqueeze(-1) * F.gelu(state / (t + 1))).sum(dim=-2))
    return torch.stack(ys, dim=1)


def hypermix_naive(w1, w2, x) -> torch.Tensor:
    """O(L^2) reference: H_t = sum_s tril[t, s] w1_s x_s^T, built for every t at once."""
    L = x.shape[1]
    tril = torch.tril(torch.ones(L, L, dtype=torch.float64, device=x.device))
    Hs = torch.einsum("ts,bshk,bshe->bthke", tril, w1.double(), x.double())
    n = torch.arange(1, L + 1, device=x.device, dtype=torch.float64).view(1, L, 1, 1, 1)
    return torch.einsum("bthk,bthke->bthe", w2.double(), F.gelu(Hs / n)).float()
