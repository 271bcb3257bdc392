"""Tensor comparisons for the lesson tests: on a mismatch, say what was compared, the largest error and where
(from torch.testing's report), instead of printing two tensors."""
import torch


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, what: str = "output"):
    """got == want up to atol + rtol * |want| (as torch.allclose), with the same shape. The message's first
    line names `what` and the largest absolute difference with its index; the rest is torch.testing's report."""

    def message(report: str) -> str:
        lines = [line for line in report.splitlines() if line.strip()]
        greatest = [line for line in lines if line.startswith("Greatest absolute difference")]
        return f"{what} differs from the reference: {(greatest or lines)[0]}\n{report}"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, check_dtype=False, check_device=False, msg=message)
