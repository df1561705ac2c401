"""Switched (piecewise-linear) codes: one linear code per kind of window, picked per window.

A single linear code keeps the same k coefficients of every window. Windows differ in where their
energy lies (a bass line, a hi-hat pattern, an onset smeared over the window), so a code that
switches between a few coefficient sets, and sends which one it used, keeps more of each window
for the same count of numbers. Two kinds, both fitted without gradients:

- :class:`SwitchedCode`, a classified transform code (image coding's classified DCT, Chen &
  Smith 1977): every mode keeps its own `k` coefficients of a fixed orthonormal transform, the
  2-D DCT of the whole window or of 2, 4, ... time blocks (AAC's block switching against smeared
  onsets, ISO/IEC 13818-7). A mode fits only which coefficients it keeps (no means, no bases): as
  few fitted parameters as the frozen 2-D DCT code of musicvae.models.linear_codes, which is why
  that code generalises to other music.
- :class:`ClusteredPCA`: a mean and `k` principal components per mode. It fits 16384 x k numbers
  per mode, and overfits the training windows as PCA does (docs/quality.md "A switched code").

Both encode a window to ``(index, coefficients)``: the mode whose reconstruction error is
lowest (analysis by synthesis, as a speech codec searches its codebook), then that mode's
`k` coefficients. Both are fitted by the generalised Lloyd algorithm (Linde, Buzo & Gray 1980):
assign each training window to its best mode, refit each mode on its windows, repeat; each step
lowers the training error, so it stops when no window changes mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from musicvae.models.linear_codes import CHUNK, LinearCode, dct_basis, fit_pca
from musicvae.models.prior import kmeans_pp_responsibilities


def block_dct_basis(n: int, blocks: int) -> Tensor:
    """``(n, n)`` float64 orthonormal rows: the DCT-II of each of `blocks` equal blocks of `n` samples."""
    if blocks < 1 or n % blocks:
        raise ValueError(f"{blocks} time blocks do not split {n} frames evenly")
    size = n // blocks
    return torch.block_diag(*[dct_basis(size)] * blocks)


@dataclass
class SwitchedCode:
    """Modes that each keep `k` coefficients of one block-DCT layout, around one training mean.

    Attributes:
        mean: ``(M*T,)`` float32 training mean (the frozen 2-D DCT code's).
        shape: ``(M, T)`` of a window.
        blocks: time blocks of each layout (1: the 2-D DCT of the whole window).
        layout: ``(K,)`` long, each mode's layout (an index into `blocks`).
        support: ``(K, k)`` long, the coefficients (flattened ``(M, T)`` positions in its layout)
            each mode keeps, by decreasing training energy among its windows.
    """

    mean: Tensor
    shape: tuple[int, int]
    blocks: tuple[int, ...]
    layout: Tensor
    support: Tensor
    _bases: tuple[Tensor, list[Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m, t = self.shape
        self._bases = dct_basis(m), [block_dct_basis(t, b) for b in self.blocks]

    @property
    def n_modes(self) -> int:
        return int(self.support.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.support.shape[1])

    def coefficients(self, x: Tensor, layout: int) -> Tensor:
        """``(B, ...)`` windows -> ``(B, M*T)`` float64 coefficients of ``x - mean`` in `layout`."""
        m, t = self.shape
        mel, time = self._bases[0], self._bases[1][layout]
        centred = (x.flatten(1).double() - self.mean.double()).view(-1, m, t)  # (B, M*T) -> (B, M, T)
        return torch.einsum("jm,bmt,kt->bjk", mel, centred, time).flatten(1)

    def masks(self, layout: int) -> Tensor:
        """``(K_layout, M*T)`` float64: 1 where each of the layout's modes keeps a coefficient."""
        support = self.support[self.layout == layout]
        return torch.zeros(len(support), self.mean.numel(), dtype=torch.float64).scatter_(1, support, 1.0)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, ...)`` -> (``(B,)`` mode index, ``(B, k)`` float64 coefficients).

        The mode that keeps the most energy of ``x - mean`` (the transforms are orthonormal, so
        that is the one whose reconstruction error is lowest).
        """
        coefs = [self.coefficients(x, i) for i in range(len(self.blocks))]
        kept = torch.empty(len(x), self.n_modes, dtype=torch.float64)
        for i, y in enumerate(coefs):
            kept[:, self.layout == i] = y.pow(2) @ self.masks(i).T  # (B, M*T) @ (M*T, K_i)
        index = kept.argmax(dim=1)
        stacked = torch.stack(coefs)  # (L, B, M*T)
        rows = stacked[self.layout[index], torch.arange(len(x))]  # each window's coefficients in its mode's layout
        return index, rows.gather(1, self.support[index])

    def decode(self, index: Tensor, code: Tensor) -> Tensor:
        """(``(B,)`` mode index, ``(B, k)`` coefficients) -> ``(B, M, T)`` float64 windows."""
        m, t = self.shape
        out = torch.empty(len(index), m, t, dtype=torch.float64)
        for i, time in enumerate(self._bases[1]):
            rows = (self.layout[index] == i).nonzero().squeeze(1)
            y = torch.zeros(len(rows), m * t, dtype=torch.float64).scatter_(1, self.support[index[rows]],
                                                                            code[rows].double())
            out[rows] = torch.einsum("jm,bjk,kt->bmt", self._bases[0], y.view(-1, m, t), time)  # the inverse: B^T Y C
        return out + self.mean.double().view(m, t)

    def reconstruct(self, x: Tensor) -> Tensor:
        """`x` through its best mode, in `x`'s shape and dtype."""
        return self.decode(*self.encode(x)).reshape(x.shape).to(x.dtype)


@dataclass
class ClusteredPCA:
    """A :class:`LinearCode` (mean and `k` principal components) per mode."""

    codes: list[LinearCode]

    @property
    def n_modes(self) -> int:
        return len(self.codes)

    def errors(self, x: Tensor) -> Tensor:
        """``(B, ...)`` -> ``(B, K)`` float64 squared reconstruction error of each mode."""
        out = []
        for code in self.codes:
            centred = x.flatten(1).double() - code.mean.double()  # (B, D)
            out.append(centred.pow(2).sum(1) - (centred @ code.components.double().T).pow(2).sum(1))
        return torch.stack(out, dim=1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, ...)`` -> (``(B,)`` mode index, ``(B, k)`` float64 coordinates in that mode)."""
        index = self.errors(x).argmin(dim=1)
        code = torch.zeros(len(x), max(c.n_components for c in self.codes), dtype=torch.float64)
        for i, mode in enumerate(self.codes):
            rows = (index == i).nonzero().squeeze(1)
            code[rows, :mode.n_components] = mode.encode(x[rows]).double()
        return index, code

    def decode(self, index: Tensor, code: Tensor, shape: Sequence[int]) -> Tensor:
        """(``(B,)`` mode index, ``(B, k)`` coordinates) -> ``(B, *shape)`` float64 windows."""
        out = torch.empty(len(index), *shape, dtype=torch.float64)
        for i, mode in enumerate(self.codes):
            rows = (index == i).nonzero().squeeze(1)
            out[rows] = mode.decode(code[rows, :mode.n_components].to(mode.mean.dtype), shape).double()
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(*self.encode(x), x.shape[1:]).to(x.dtype)


def initial_partition(energy: Tensor, k: int, clusters: int, seed: int) -> Tensor:
    """``(N,)`` cluster of each window: k-means++ and Lloyd on the magnitudes of its `k` strongest coefficients.

    Args:
        energy: ``(N, D)`` squared coefficients of the centred windows in one orthonormal transform.
        k: how many coefficients (those of largest total energy) describe a window.
        clusters: K.
        seed: of the k-means++ start.
    """
    top = energy.double().sum(0).topk(k).indices
    features = energy[:, top].double().sqrt()  # (N, k): where a window's energy lies, not its signs
    return kmeans_pp_responsibilities(features, clusters, torch.Generator().manual_seed(seed)).argmax(dim=1)


def fit_switched_code(data: Tensor, shape: tuple[int, int], k: int, modes: int, blocks: Sequence[int] = (1,),
                      iters: int = 10, seed: int = 0) -> SwitchedCode:
    """A :class:`SwitchedCode` of `modes` modes, fitted on the rows of `data` by the generalised Lloyd algorithm.

    Args:
        data: ``(N, M*T)`` flattened training windows.
        shape: ``(M, T)``.
        k: coefficients per mode (e.g. 127, so that with the mode index a window costs 128 numbers).
        modes: K, split evenly over the layouts in `blocks`.
        blocks: time blocks of each layout; each must divide T.
        iters: at most this many assign-and-refit rounds (it stops earlier once no window changes mode).
        seed: of the k-means++ start (on the first layout's coefficients).

    Returns:
        The fitted code; with ``modes=1`` and ``blocks=(1,)`` it is the frozen 2-D DCT code with `k`
        coefficients (musicvae.models.linear_codes.fit_separable_code with ``mel_basis="dct"``).
    """
    m, t = shape
    n = len(data)
    blocks = tuple(int(b) for b in blocks)
    if data.dim() != 2 or data.shape[1] != m * t:
        raise ValueError(f"fit_switched_code expects (N, {m}*{t}) rows, got {tuple(data.shape)}")
    if not blocks or modes % len(blocks) or not 1 <= modes // len(blocks) <= n:
        raise ValueError(f"fit_switched_code: {modes} modes must be a multiple of the {len(blocks)} layouts "
                         f"{blocks}, with at most {n} (the windows) per layout")
    if not 1 <= k <= m * t:
        raise ValueError(f"fit_switched_code: {k} coefficients need 1 <= k <= {m * t}")
    per = modes // len(blocks)
    layout = torch.arange(len(blocks)).repeat_interleave(per)
    code = SwitchedCode(data.double().mean(0).float(), (m, t), blocks, layout, torch.zeros(modes, k, dtype=torch.long))
    # Squared coefficients of every window in every layout (float32: N x M*T x 4 bytes per layout);
    # the fit needs nothing else, since the mean is fixed and the transforms are orthonormal.
    energy = [torch.cat([code.coefficients(data[s:s + CHUNK], i).pow(2).float() for s in range(0, n, CHUNK)])
              for i in range(len(blocks))]
    for i, e in enumerate(energy):  # a mode that never gets a window stays the frozen code of its layout
        code.support[layout == i] = e.double().sum(0).topk(k).indices
    assign = initial_partition(energy[0], k, per, seed).repeat(len(blocks), 1)  # (L, N): the same start in each layout
    for _ in range(iters + 1):
        for i, e in enumerate(energy):  # each mode keeps the coefficients of most energy among its windows
            members = torch.nn.functional.one_hot(assign[i].clamp_min(0), per).double() * (assign[i] >= 0)[:, None]
            totals = torch.cat([members[s:s + CHUNK].T @ e[s:s + CHUNK].double() for s in range(0, n, CHUNK)]
                               ).view(-1, per, m * t).sum(0)  # (per, M*T)
            for j in (members.sum(0) > 0).nonzero().squeeze(1).tolist():  # an empty mode keeps its coefficients
                code.support[i * per + j] = totals[j].topk(k).indices
        masks = [code.masks(i).T for i in range(len(blocks))]  # (M*T, K_i) each
        kept = torch.cat([torch.cat([e[s:s + CHUNK].double() @ mask for e, mask in zip(energy, masks)], 1)
                          for s in range(0, n, CHUNK)])  # (N, K)
        best = kept.argmax(dim=1)
        new = torch.where(layout[best][None, :] == torch.arange(len(blocks))[:, None], best % per, -1)  # (L, N)
        if torch.equal(new, assign):
            break
        assign = new
    return code


def fit_clustered_pca(data: Tensor, shape: tuple[int, int], k: int, modes: int, iters: int = 10,
                      seed: int = 0) -> ClusteredPCA:
    """A :class:`ClusteredPCA` of at most `modes` modes, fitted by the generalised Lloyd algorithm.

    The start is the same k-means partition as :func:`fit_switched_code`'s. A mode left with at most
    `k` windows (too few for `k` components) is dropped and its windows go to the others.

    Args:
        data: ``(N, M*T)`` flattened training windows.
        shape: ``(M, T)``.
        k: principal components per mode.
        modes: K at the start.
        iters: at most this many assign-and-refit rounds.
        seed: of the k-means++ start.
    """
    if data.dim() != 2 or data.shape[1] != shape[0] * shape[1] or not 1 <= modes * (k + 1) <= len(data):
        raise ValueError(f"fit_clustered_pca: {modes} modes of {k} components need (N, {shape[0]}*{shape[1]}) rows "
                         f"and at least {modes * (k + 1)} of them, got {tuple(data.shape)}")
    dct = SwitchedCode(data.double().mean(0).float(), shape, (1,), torch.zeros(1, dtype=torch.long),
                       torch.zeros(1, k, dtype=torch.long))
    energy = torch.cat([dct.coefficients(data[s:s + CHUNK], 0).pow(2).float() for s in range(0, len(data), CHUNK)])
    assign = initial_partition(energy, k, modes, seed)
    del energy
    code = None
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=int(assign.max()) + 1)
        code = ClusteredPCA([fit_pca(data[assign == j], k) for j in range(len(counts)) if counts[j] > k])
        new = torch.cat([code.errors(data[s:s + CHUNK]).argmin(1) for s in range(0, len(data), CHUNK)])
        if torch.equal(new, assign):
            break
        assign = new
    return code
