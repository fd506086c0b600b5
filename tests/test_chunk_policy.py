"""The torch backend's chunk policy: a workspace bound in bytes (default and FUSED_ENTROPY_WORKSPACE_MIB)."""
import pytest
import torch

import fused_entropy as fe
from fused_entropy.backends import torch_chunked as tc


def test_default_bound_is_64_mib_over_three_blocks(monkeypatch):
    monkeypatch.delenv(tc.WORKSPACE_ENV, raising=False)
    assert tc.workspace_bytes() == 64 << 20
    assert tc.chunk_rows(2048, 32768) == 170  # 3 fp32 [C, V] blocks in 64 MiB
    assert tc.chunk_rows(65536, 32768) == 170  # independent of N: memory stays flat
    assert tc.chunk_rows(100, 32768) == 100
    assert tc.chunk_rows(2048, 32768, itemsize=8) == 85
    assert tc.chunk_rows(10, 1 << 30) == 1  # never 0 rows


def test_env_knob(monkeypatch):
    monkeypatch.setenv(tc.WORKSPACE_ENV, "16")
    assert tc.chunk_rows(2048, 32768) == 42
    monkeypatch.setenv(tc.WORKSPACE_ENV, "0.5")
    assert tc.chunk_rows(2048, 32768) == 1
    for bad in ("0", "-3", "lots", "inf"):
        monkeypatch.setenv(tc.WORKSPACE_ENV, bad)
        with pytest.raises(ValueError, match="FUSED_ENTROPY_WORKSPACE_MIB must be a positive number of MiB"):
            tc.workspace_bytes()


def test_results_do_not_depend_on_the_bound(monkeypatch):
    """fp64: one chunk or many, log-probs, entropies and gradients agree (the bound is only a memory knob)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, dtype=torch.float64)
    w = torch.randn(301, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 301, (37,), generator=g)

    def run():
        xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fe.linear_logprobs(xa, wa, y, entropy=True, topk=8, backend="torch")
        (out.logprobs.sum() + out.entropy.sum() + out.clamped_entropy.sum()).backward()
        return out.logprobs, out.entropy, out.clamped_entropy, xa.grad, wa.grad

    monkeypatch.delenv(tc.WORKSPACE_ENV, raising=False)
    whole = run()
    monkeypatch.setenv(tc.WORKSPACE_ENV, str(3 * 5 * 301 * 8 / 2**20))  # 5-row chunks
    assert tc.chunk_rows(37, 301, itemsize=8) == 5
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_grpo_loss_chunks_by_the_same_bound(monkeypatch):
    """LinearGRPOLoss's single pass takes its rows from the torch backend: 4 blocks within the bound."""
    monkeypatch.delenv(tc.WORKSPACE_ENV, raising=False)
    assert tc.single_pass_rows(2048, 32768, torch.float32) == 128
    assert tc.single_pass_rows(2048, 32768, torch.bfloat16) == 128  # computed in fp32
    monkeypatch.setenv(tc.WORKSPACE_ENV, "32")
    assert tc.single_pass_rows(2048, 32768, torch.float64) == 32
