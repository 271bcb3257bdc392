"""Tensor comparisons for the lesson tests: on a mismatch, say what was compared, the largest error and where
(torch.testing's report), instead of printing two tensors."""
import torch


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, what: str = "output"):
    """got == want up to atol + rtol * |want| (as torch.allclose), with the same shape. The message names
    `what`, the largest absolute difference and its index, and how many elements differ."""
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, check_dtype=False, check_device=False,
                               msg=lambda report: f"{what} differs from the reference: {report}")
