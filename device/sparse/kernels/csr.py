"""The CSR structure of a mask, and the tensors it keeps for every step that uses it.

A planned layer's weight, viewed as a 2-D ``[rows, cols]`` matrix (a convolution's as
``[out_channels, in_channels * kh * kw]``), computes through the CSR matrix of its mask: the
structure is built once per mask (:func:`csr_structure`) and also holds the transposed
structure and per-dtype buffers that every training step reuses instead of allocating anew.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from device.errors import ConfigError

__all__ = ["CsrStructure", "csr_structure", "gather_values"]

# torch warns once per process that CSR support is "in beta"; the kernels are tested against
# dense compute here, so the warning carries no information for our users.
warnings.filterwarnings(
    "ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning
)


@dataclass(frozen=True, eq=False)
class CsrStructure:
    """The CSR structure of a 2-D mask ``[rows, cols]`` and of its transpose.

    Attributes:
        shape: ``(rows, cols)`` of the weight's 2-D view.
        flat_index: int64 ``[nnz]``, row-major positions of the kept entries in the 2-D view,
            ascending (this is CSR value order).
        crow, col: int32 CSR row pointers ``[rows + 1]`` and column indices ``[nnz]``.
        t_crow, t_col: the same for the transposed ``[cols, rows]`` matrix.
        t_order: int32 ``[nnz]``; ``values[t_order]`` are the transposed matrix's CSR values.
    """

    shape: tuple[int, int]
    flat_index: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_order: torch.Tensor
    # Tensors made once per structure and reused by every step: (purpose, dtype) -> tensor.
    _cache: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        """Number of kept entries."""
        return int(self.flat_index.numel())

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``[rows, cols]`` holding ``values`` (CSR order) at the kept entries."""
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``[cols, rows]`` of the transpose, from the same ``values``.

        Its values live in one buffer per structure and dtype, rewritten by every call: the
        matrix is valid until the next call (the kernels use it at once, in a backward).
        """
        dtype = values.dtype
        permuted = self._cached("transposed", dtype, lambda: torch.empty(self.nnz, dtype=dtype))
        torch.index_select(values, 0, self.t_order, out=permuted)
        return torch.sparse_csr_tensor(
            self.t_crow, self.t_col, permuted, self.shape[::-1], check_invariants=False
        )

    def sampled(self, g_t: torch.Tensor, x: torch.Tensor, *, reuse: bool) -> torch.Tensor:
        """``(g_t @ x)`` at the kept entries, in CSR value order: ``[nnz]``.

        ``g_t`` is ``[rows, n]``, ``x`` is ``[n, cols]``. With ``reuse`` the result is a view of
        one buffer per structure and dtype that every such call rewrites; otherwise a new tensor.
        """
        dtype = g_t.dtype
        out = None
        if reuse:
            out = self._cached(
                "sampled", dtype, lambda: self.matrix(torch.empty(self.nnz, dtype=dtype))
            )
        result = torch.sparse.sampled_addmm(self.pattern(dtype), g_t, x, beta=0.0, out=out)
        values: torch.Tensor = result.values()
        return values

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """A CSR matrix of ones with this structure (``sampled_addmm``'s sampling pattern)."""
        return self._cached(
            "pattern", dtype, lambda: self.matrix(torch.ones(self.nnz, dtype=dtype))
        )

    def _cached(
        self, purpose: str, dtype: torch.dtype, make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The structure's tensor for ``purpose`` and ``dtype``, made by ``make`` on first use."""
        key = (purpose, dtype)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _crow_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(torch.int32)


def csr_structure(mask2d: torch.Tensor) -> CsrStructure:
    """The :class:`CsrStructure` of a bool ``[rows, cols]`` mask (True = kept).

    int32 indices: MKL's sparse routines use them natively and they halve the index memory.
    Raises ``ConfigError`` if the mask is not 2-D bool or has more than 2**31 - 1 entries.
    """
    if mask2d.dtype != torch.bool or mask2d.dim() != 2:
        raise ConfigError(
            f"a CSR structure needs a 2-D bool mask, got {mask2d.dtype} of shape "
            f"{tuple(mask2d.shape)}"
        )
    rows, cols = (int(s) for s in mask2d.shape)
    if rows * cols >= 2**31:
        raise ConfigError(f"mask of shape {(rows, cols)} is too large for int32 CSR indices")
    mask2d = mask2d.detach().to("cpu")
    flat_index = mask2d.reshape(-1).nonzero().squeeze(1)
    # Row and column of each kept entry in int32 (rows * cols < 2**31): the temporaries of a
    # structure are a few times nnz, and it is built while the model is in memory.
    flat32 = flat_index.to(torch.int32)
    r = torch.div(flat32, cols, rounding_mode="floor")
    c = flat32 - r * cols
    del flat32
    # Transpose: sort the kept entries by (col, row); a stable sort by col keeps rows ascending.
    t_order = torch.sort(c, stable=True).indices.to(torch.int32)
    return CsrStructure(
        shape=(rows, cols),
        flat_index=flat_index,
        crow=_crow_from_rows(r, rows),
        col=c,
        t_crow=_crow_from_rows(c, cols),
        t_col=r.index_select(0, t_order),
        t_order=t_order,
    )


def gather_values(weight: torch.Tensor, structure: CsrStructure) -> torch.Tensor:
    """The kept entries of ``weight`` (``[nnz]``, CSR value order), with autograd."""
    return weight.reshape(-1).index_select(0, structure.flat_index)
