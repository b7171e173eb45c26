"""Dense relative localisation (DRLoc, Liu et al., NeurIPS 2021): predict where two patches sit.

Reference: Liu et al., "Efficient Training of Visual Transformers with Small Datasets"
(NeurIPS 2021); the authors' code is the GitHub repository yhlleo/VTs-Drloc.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spatial_entropy.checks import check_grid_shape

__all__ = [
    "DRLocHead",
    "drloc_loss",
    "relative_offsets",
    "sample_position_pairs",
]


def sample_position_pairs(
    batch: int,
    grid_shape: tuple[int, int],
    pairs: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``pairs`` pairs of patch positions per image, uniformly and independently.

    Both positions of a pair are drawn with replacement over the whole grid, as in the
    reference, so a pair may repeat a position (its offset is then 0). The draw runs on
    ``device`` with ``generator`` (which must live on that device), so no host sync happens.

    Args:
        batch: images ``B``.
        grid_shape: ``(gh, gw)``.
        pairs: pairs per image ``m``.
        generator: the random stream; ``None`` uses the global one of ``device``.
        device: where the indices are drawn (default: the generator's device, else CPU).

    Returns:
        ``(B, m, 2)`` int64 row-major flat indices ``i * gw + j`` into the grid.

    Raises:
        ValueError: ``batch`` or ``pairs`` < 1, or a malformed ``grid_shape``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_position_pairs(2, (3, 4), 5, g).shape
        torch.Size([2, 5, 2])
    """
    gh, gw = check_grid_shape(grid_shape)
    if batch < 1 or pairs < 1:
        raise ValueError(f"Expected batch >= 1 and pairs >= 1, got batch={batch}, pairs={pairs}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randint(gh * gw, (batch, pairs, 2), generator=generator, device=device)


def relative_offsets(positions: Tensor, grid_shape: tuple[int, int]) -> Tensor:
    """Normalised offsets ``((i - p) / gh, (j - q) / gw)`` of position pairs.

    Args:
        positions: ``(..., 2)`` flat indices; ``[..., 0]`` is ``(i, j)``, ``[..., 1]`` is
            ``(p, q)``, row-major on a ``(gh, gw)`` grid.
        grid_shape: ``(gh, gw)``.

    Returns:
        ``(..., 2)`` float32 offsets in ``(-1, 1)``: row offset, then column offset.

    Example:
        >>> relative_offsets(torch.tensor([[5, 0]]), (2, 4))  # (1, 1) against (0, 0)
        tensor([[0.5000, 0.2500]])
    """
    gh, gw = check_grid_shape(grid_shape)
    rows, cols = positions // gw, positions % gw
    # Python-scalar divisors: no host-to-device copy inside the training step.
    row_offsets = (rows[..., 0] - rows[..., 1]).float() / gh
    col_offsets = (cols[..., 0] - cols[..., 1]).float() / gw
    return torch.stack([row_offsets, col_offsets], dim=-1)


class DRLocHead(nn.Module):
    """The localisation MLP: two concatenated embeddings in, their normalised offset out.

    ``Linear(2D, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2)``,
    two hidden layers as in the reference (512 wide there).

    Args:
        embed_dim: token embedding size ``D``.
        hidden: width of the hidden layers.

    Shape:
        - Input: ``(*, 2 * D)``
        - Output: ``(*, 2)``
    """

    def __init__(self, embed_dim: int, hidden: int = 512) -> None:
        super().__init__()
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"Expected embed_dim, hidden >= 1, got {embed_dim}, {hidden}")
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2),
        )

    def forward(self, pair_embeddings: Tensor) -> Tensor:
        return self.layers(pair_embeddings)


def drloc_loss(
    tokens: Tensor, grid_shape: tuple[int, int], head: nn.Module, positions: Tensor
) -> Tensor:
    """DRLoc loss: L1 error of the head's predicted offsets, averaged over pairs and images.

    For each image and pair ``((i, j), (p, q))`` the head sees the two token embeddings
    concatenated and predicts ``((i - p) / gh, (j - q) / gw)`` (the paper's normalised
    offsets); the error of a pair is the L1 distance ``|du - tu| + |dv - tv|`` between predicted
    and true offset (the paper's ``|| . ||_1``). The loss is the **mean** over pairs and
    images, an unbiased estimate of the expectation over all position pairs whatever ``m`` is
    (the reference maintainers agreed, in yhlleo/VTs-Drloc issue 11, that the loss must not
    grow with ``m``). It is computed in float32 even under autocast.

    Scale against the reference code: its default L1 mode regresses raw patch offsets shifted
    by ``H - 1`` (no normalisation) and averages over the two coordinates too, so its value is
    about ``gh / 2`` times ours for the same fit; a lambda taken from the reference code
    corresponds to a larger lambda here (e.g. about 7x on a 14 x 14 grid).

    Args:
        tokens: ``(B, gh * gw, D)`` patch-token embeddings, row-major on the grid (prefix
            tokens removed).
        grid_shape: ``(gh, gw)``.
        head: maps ``(B, m, 2 * D)`` to ``(B, m, 2)`` (a :class:`DRLocHead`).
        positions: ``(B, m, 2)`` int64 flat indices of the pairs
            (see :func:`sample_position_pairs`).

    Returns:
        0-dim float32 loss.

    Raises:
        ValueError: shapes or dtypes that do not fit.

    Example:
        >>> tokens, head = torch.randn(2, 12, 8), DRLocHead(8, hidden=16)
        >>> positions = sample_position_pairs(2, (3, 4), 5, torch.Generator().manual_seed(0))
        >>> drloc_loss(tokens, (3, 4), head, positions).shape
        torch.Size([])
    """
    gh, gw = check_grid_shape(grid_shape)
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[1] != gh * gw:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"Expected tokens of shape (B, {gh}*{gw}, D), got {shape}")
    batch = tokens.shape[0]
    if (
        not isinstance(positions, Tensor)
        or positions.dtype != torch.int64
        or positions.ndim != 3
        or positions.shape[0] != batch
        or positions.shape[2] != 2
    ):
        shape = tuple(positions.shape) if isinstance(positions, Tensor) else positions
        raise ValueError(f"Expected int64 positions of shape ({batch}, m, 2), got {shape}")
    # (B, m, 2, D) -> (B, m, 2D): the two embeddings of each pair side by side.
    pair_embeddings = tokens[torch.arange(batch, device=tokens.device)[:, None, None], positions]
    predicted = head(pair_embeddings.flatten(2))
    target = relative_offsets(positions, (gh, gw))
    return (predicted.float() - target).abs().sum(-1).mean()
