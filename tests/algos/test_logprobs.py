"""Chunked log-prob and entropy (torch path) against a float64 reference written plainly here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algos.logprobs import logprobs_and_entropy, logprobs_and_entropy_from_hidden

IGNORE = -100


def reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """float64: log_softmax, gather, -(softmax * log_softmax).sum; 0 log-prob at ignored positions."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    has_target = tokens != IGNORE
    chosen = torch.gather(log_p, -1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(torch.softmax(logits.double() / temperature, dim=-1) * log_p).sum(-1)
    return torch.where(has_target, chosen, torch.zeros_like(chosen)), entropy


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def values_and_grads(fn, logits, tokens, g_lp, g_ent, **kwargs):
    x = logits.detach().clone().requires_grad_()
    lp, ent = fn(x, tokens, **kwargs)
    (grad,) = torch.autograd.grad((lp, ent), x, (g_lp.to(lp.dtype), g_ent.to(ent.dtype)))
    return lp, ent, grad


# Tolerances (METHOD.md): float32 arithmetic on the same input values lands far under 1e-3 relative
# to float64; 1e-5 allows for summation-order differences over V terms. For bf16 inputs the values
# still agree to float32 level (the reference upcasts the same bf16 numbers); the bf16 gradient is
# rounded once to 8 mantissa bits (relative 2^-9 ~ 2e-3 per element), so 1e-2.
CASES = {
    # name: (dtype, scale, temperature, value tol, grad tol)
    "fp32": (torch.float32, 2.0, 1.0, 1e-5, 1e-5),
    "fp32_temp0.7": (torch.float32, 2.0, 0.7, 1e-5, 1e-5),
    "fp32_temp1.3_peaked": (torch.float32, 40.0, 1.3, 1e-5, 1e-5),
    "fp32_flat": (torch.float32, 1e-3, 0.8, 1e-5, 1e-5),
    "bf16": (torch.bfloat16, 2.0, 1.0, 1e-5, 1e-2),
    "bf16_temp0.8_peaked": (torch.bfloat16, 30.0, 0.8, 1e-5, 1e-2),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_values_and_grads_match_float64(case, chunk_size):
    dtype, scale, temperature, tol, grad_tol = CASES[case]
    num_tokens, vocab = 29, 301
    logits = (torch.randn(num_tokens, vocab) * scale).to(dtype)
    tokens = torch.randint(0, vocab, (num_tokens,))
    tokens[[0, 5, 17]] = IGNORE
    g_lp, g_ent = torch.randn(num_tokens), torch.randn(num_tokens)
    lp, ent, grad = values_and_grads(
        logprobs_and_entropy, logits, tokens, g_lp, g_ent, temperature=temperature, chunk_size=chunk_size
    )
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    x64 = logits.double().requires_grad_()
    ref_lp, ref_ent = reference(x64, tokens, temperature)
    (ref_grad,) = torch.autograd.grad((ref_lp, ref_ent), x64, (g_lp.double(), g_ent.double()))
    assert rel_err(lp, ref_lp) < tol
    # a flat distribution has H ~ log V (large) and a peaked one H ~ 0: compare absolutely there
    assert (ent.double() - ref_ent).abs().max().item() < tol * max(1.0, ref_ent.abs().max().item())
    assert rel_err(grad, ref_grad) < grad_tol
    assert (lp[[0, 5, 17]] == 0).all()


def test_batched_shape_and_peaked_limits():
    # Hand-worked: row 0 logits [0, ln 3] -> p = [1/4, 3/4]; token 1 -> log p = ln(3/4);
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446. Row 1 is one-hot-peaked: log p(argmax) = 0, H = 0.
    logits = torch.tensor([[[0.0, 1.0986122886681098], [1000.0, 0.0]]])
    tokens = torch.tensor([[1, 0]])
    lp, ent = logprobs_and_entropy(logits, tokens)
    assert lp.shape == ent.shape == (1, 2)
    torch.testing.assert_close(lp, torch.tensor([[-0.2876820724517809, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, torch.tensor([[0.5623351446188083, 0.0]]), rtol=0, atol=1e-6)


def test_flat_distribution_entropy_is_log_vocab():
    vocab = 1000
    lp, ent = logprobs_and_entropy(torch.full((3, vocab), 7.0), torch.tensor([0, 5, 999]), temperature=0.5)
    expected = torch.tensor(vocab, dtype=torch.float64).log().item()  # log 1000 = 6.907755...
    torch.testing.assert_close(ent.double(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(lp.double(), torch.full((3,), -expected, dtype=torch.float64), rtol=1e-6, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    num_tokens=st.integers(1, 12),
    vocab=st.integers(2, 40),
    chunk=st.integers(1, 13),
    temperature=st.floats(0.25, 2.0),
    scale=st.floats(0.01, 20.0),
    seed=st.integers(0, 2**16),
)
def test_chunking_never_changes_results(num_tokens, vocab, chunk, temperature, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, vocab, generator=gen) * scale
    tokens = torch.randint(0, vocab, (num_tokens,), generator=gen)
    g_lp, g_ent = torch.randn(num_tokens, generator=gen), torch.randn(num_tokens, generator=gen)
    kw = dict(temperature=temperature)
    whole = values_and_grads(logprobs_and_entropy, logits, tokens, g_lp, g_ent, chunk_size=num_tokens, **kw)
    chunked = values_and_grads(logprobs_and_entropy, logits, tokens, g_lp, g_ent, chunk_size=chunk, **kw)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # rows are independent: chunking is exact
    # invariants: log p <= 0, 0 <= H <= log V
    assert (whole[0] <= 0).all() and (whole[1] >= -1e-6).all()
    assert (whole[1] <= torch.tensor(float(vocab)).log() + 1e-5).all()


def test_unused_entropy_and_logprob_only():
    logits = torch.randn(6, 11)
    tokens = torch.randint(0, 11, (6,))
    g = torch.randn(6)
    x = logits.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x, tokens, compute_entropy=False, temperature=0.9)
    assert ent is None
    (grad,) = torch.autograd.grad(lp, x, g)
    x64 = logits.double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference(x64, tokens, 0.9)[0], x64, g.double())
    assert rel_err(grad, ref_grad) < 1e-5
    # entropy computed but only the log-prob used downstream: the backward gets None for entropy
    y = logits.clone().requires_grad_()
    lp2, _ = logprobs_and_entropy(y, tokens, temperature=0.9)
    (grad2,) = torch.autograd.grad(lp2, y, g)
    torch.testing.assert_close(grad2, grad, rtol=1e-6, atol=1e-7)


def test_inplace_backward_reuses_the_logits_buffer():
    logits = torch.randn(9, 31)
    tokens = torch.randint(0, 31, (9,))
    g_lp, g_ent = torch.randn(9), torch.randn(9)
    expected = values_and_grads(logprobs_and_entropy, logits, tokens, g_lp, g_ent)[2]
    x = logits.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x, tokens, inplace_backward=True)
    (grad,) = torch.autograd.grad((lp, ent), x, (g_lp, g_ent))
    assert grad.data_ptr() == x.data_ptr()
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("temperature, chunk_size", [(1.0, None), (0.6, 13), (0.6, 1), (1.3, 96)])
def test_from_hidden_matches_float64(temperature, chunk_size):
    num_tokens, hidden_size, vocab = 23, 16, 97
    hidden = torch.randn(num_tokens, hidden_size)
    hidden[7] *= 30  # a very peaked row: its entropy ~ 0 must survive the merge of vocabulary chunks
    hidden[8] *= 1e-3  # a nearly flat row
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    tokens = torch.randint(0, vocab, (num_tokens,))
    tokens[3] = IGNORE
    g_lp, g_ent = torch.randn(num_tokens), torch.randn(num_tokens)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = logprobs_and_entropy_from_hidden(h, w, tokens, temperature=temperature, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad((lp, ent), (h, w), (g_lp, g_ent))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_lp, ref_ent = reference(h64 @ w64.T, tokens, temperature)
    ref_gh, ref_gw = torch.autograd.grad((ref_lp, ref_ent), (h64, w64), (g_lp.double(), g_ent.double()))
    for a, b in ((lp, ref_lp), (ent, ref_ent), (gh, ref_gh), (gw, ref_gw)):
        assert rel_err(a, b) < 1e-5  # fp32 products and fp32 row math
    assert (ent.double() - ref_ent).abs().max() < 1e-5  # absolute, so the peaked row's tiny H counts


def test_from_hidden_weight_only_grad():
    hidden = torch.randn(8, 4)
    w = torch.randn(10, 4, requires_grad=True)
    lp, _ = logprobs_and_entropy_from_hidden(hidden, w, torch.randint(0, 10, (8,)), compute_entropy=False)
    lp.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=torch.tensor([0, 50])), r"\[0, 50\).*max=50"),
        (dict(tokens=torch.tensor([0, -3])), r"min=-3"),
        (dict(tokens=torch.tensor([0.0, 1.0])), "int64 or int32"),
        (dict(tokens=torch.tensor([0, 1, 2])), "same leading shape"),
        (dict(temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(chunk_size=0), "chunk_size=0 must be >= 1"),
        (dict(backend="cuda"), r"backend='cuda' is not one of \['auto', 'torch', 'triton'\]"),
        (dict(backend="triton"), "needs CUDA tensors"),
    ],
)
def test_bad_input_names_the_cause(kwargs, match):
    args = dict(logits=torch.randn(2, 50), tokens=torch.tensor([0, 1]))
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(ValueError, match=match):
        logprobs_and_entropy(args["logits"], args["tokens"], **kwargs)


def test_from_hidden_bad_shapes():
    with pytest.raises(ValueError, match="same H"):
        logprobs_and_entropy_from_hidden(torch.randn(3, 4), torch.randn(10, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="share dtype"):
        logprobs_and_entropy_from_hidden(
            torch.randn(3, 4), torch.randn(10, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        )


# ---------------------------------------------------------------------------------------------
# Peak extra memory on CPU, measured as the resident high-water mark (VmHWM, reset before each step) in
# a fresh interpreter: the inputs are allocated and touched first, so the growth of the high-water mark
# over the fwd+bwd step is the step's peak extra memory (torch CPU tensors come from malloc, which
# tracemalloc does not see; large blocks are mmapped and their pages show up in RSS once written).
# ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from rlkit.algos.logprobs import logprobs_and_entropy
    T, V = 4096, 4096  # fp32 logits: 64 MiB
    logits = torch.randn(T, V).requires_grad_()
    tokens = torch.randint(0, V, (T,))
    g_lp, g_ent = torch.randn(T), torch.randn(T)
    def status_bytes(field):  # this process's own mm (ru_maxrss would inherit the parent's peak over exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    def naive(x, t, a, b):
        log_p = (x.float() / 0.9).log_softmax(-1)
        lp, ent = log_p.gather(-1, t[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
        return torch.autograd.grad((lp, ent), x, (a, b))[0]
    def chunked(chunk):
        def step(x, t, a, b):
            lp, ent = logprobs_and_entropy(x, t, temperature=0.9, chunk_size=chunk, inplace_backward=True)
            return torch.autograd.grad((lp, ent), x, (a, b))[0]
        return step
    steps = [chunked(32), chunked(512), naive]
    for step in steps:  # warm up the code paths (autograd engine, first-use buffers) on a tiny input
        step(logits.detach()[:4].clone().requires_grad_(), tokens[:4], g_lp[:4], g_ent[:4])
    for step in steps:
        reset_peak()
        before = status_bytes("VmRSS")
        out = step(logits, tokens, g_lp, g_ent)
        del out
        print(status_bytes("VmHWM") - before)
    """
)


def test_cpu_peak_extra_memory_is_o_chunk():
    # The chunked steps run in place (the gradient takes the logits' buffer), so their growth is
    # all extra memory; the naive step's includes its 64 MiB gradient.
    # Each step's peak is VmHWM after a reset, minus VmRSS at the reset. Not ru_maxrss: it carries
    # the parent's peak across exec, so under a large pytest process (the full suite) every step
    # read 0. A fixed mmap threshold turns off glibc's dynamic one, which after the first large free
    # serves later [chunk, V] buffers from retained heap and made the figure vary from run to run;
    # with it every large block is mapped fresh and returned on free.
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set size")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True, env=env)
    small, large, naive = (int(v) for v in proc.stdout.split())
    logits_bytes = 4096 * 4096 * 4  # 64 MiB
    print(f"peak extra: chunk 32 {small / 2**20:.1f} MiB, chunk 512 {large / 2**20:.1f} MiB, naive {naive / 2**20:.1f}")
    # The naive path keeps several float32 [T, V] copies (log_softmax, exp, product, gradients).
    assert naive > 3 * logits_bytes

    # The chunked path holds a handful of [chunk, V] float32 temporaries (the scaled copy, exp, the
    # products and the gradient chunk in forward and backward: measured 3 at chunk 512, 24 MiB); 8 copies
    # plus 3 MiB of allocator slack is the bound, independent of T. Neither bound admits the naive path.
    def chunk_bytes(chunk):
        return chunk * 4096 * 4

    assert small < 8 * chunk_bytes(32) + (3 << 20) < 0.15 * logits_bytes
    assert large < 8 * chunk_bytes(512) + (3 << 20)
    assert large > small  # it grows with the chunk, not with T


def test_import_is_lean():
    code = (
        "import sys, rlkit.algos.logprobs, rlkit.algos.fused_linear_loss, rlkit.algos.kernels\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers', 'rlkit.rollout')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
