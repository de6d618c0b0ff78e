"""Float comparisons with a tolerance relative to the scale of the values compared.

Two float32 computations of the same quantity by different kernels (a cached step against a full forward, a
batch against each row alone, blocked against dense products) differ by a few units in the last place of the
largest values summed, and how many depends on the CPU (vector width, FMA, summation order). A bare absolute
tolerance such as 1e-5 therefore holds on one machine and fails on another (logits of size ~36 carry an error of
~1e-5 from rounding alone). `assert_close` allows rtol times the largest magnitude of `expected` on every
element, which is as tight as float32 permits and still fails on any real error, which is of the order of the
values themselves.
"""
import numpy as np
import torch

F32 = 1e-5  # float32: ~100 units in the last place of the largest value


def _tensor(x) -> torch.Tensor:
    return x.detach() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def assert_close(actual, expected, rtol: float = F32, scale: float | None = None, name: str = "") -> None:
    """Elementwise |actual - expected| <= rtol * (|expected| + scale); tensors or arrays, any float dtype.

    scale defaults to max |expected|; pass a common one for values in the same units whose own size means
    nothing (e.g. the gradients of one loss, some of which are zero up to rounding).
    """
    a, e = _tensor(actual), _tensor(expected)
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, check_dtype=False, check_device=False,
                               msg=(lambda m: f"{name}: {m}") if name else None)
