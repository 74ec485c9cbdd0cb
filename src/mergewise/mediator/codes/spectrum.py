"""The spectrum of a matrix's sampled rows, shared by the estimates of the codes that are not row-local.

The build estimates, for every sampled matrix of every task, what each low-rank level would keep. Both
low-rank codes need the same decomposition; it is computed once per sample, from the eigenvectors of
the sample's smaller Gram matrix in float64: for the ≤ 512 sampled rows of a 5632-wide matrix that is
~10× faster than an SVD of the sample.
"""

from __future__ import annotations

import functools

import torch


class SampleSpectrum:
    """A sample of a matrix's rows (float32) and, computed on first use, its singular values and top
    factors."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample.float()

    @functools.cached_property
    def energy(self) -> float:
        """‖sample‖², in float64."""
        return float(self._float64.square().sum())

    @property
    def energies(self) -> torch.Tensor:
        """The squared singular values, largest first."""
        return self._decomposition[0]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U·√S [rows, rank] and √S·Vᵀ [rank, columns] of the sample's best rank-k approximation, float32."""
        squares, vectors = self._decomposition
        sample = self._float64
        singular, vectors = squares[:rank].sqrt(), vectors[:, :rank]
        # Components at rounding level carry nothing; dividing by their singular values would only add noise.
        inverse = torch.where(singular > singular[:1] * 1e-7, 1 / singular, torch.zeros_like(singular))
        if self._wide:
            left, right = vectors, inverse[:, None] * (vectors.T @ sample)
        else:
            left, right = (sample @ vectors) * inverse, vectors.T
        root = singular.sqrt()
        return (left * root).float(), (root[:, None] * right).float()

    @property
    def _wide(self) -> bool:
        return self.sample.shape[0] <= self.sample.shape[1]

    @functools.cached_property
    def _float64(self) -> torch.Tensor:
        return self.sample.double()

    @functools.cached_property
    def _decomposition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, ≥ 0) and eigenvectors of the smaller Gram matrix, float64."""
        sample = self._float64
        gram = sample @ sample.T if self._wide else sample.T @ sample
        squares, vectors = torch.linalg.eigh(gram)
        return squares.flip(0).clamp_(min=0), vectors.flip(1)
