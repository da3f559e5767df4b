"""Data of the payload-retrieval task (the paper's §2; docs/results/toy.md): episodes and contrast sets.

An episode has `n_context` context tokens and one query token. Context token i carries two
latent variables, z1_i (rank N) and z2_i (rank M), and a payload class y_i::

    x_i = A1 z1_i + A2 z2_i + E[y_i] + noise

The query carries the latents of one target token i* through *other* encoders and no payload::

    x_q = B1 z1_i* + B2 z2_i* + noise          label = y_i*

so a model must match the query's latents against the keys' to read out the right payload.
Latents are corners of a cube, z in {-1, +1}^rank ("discrete"), or Gaussian, z ~ N(0, I)
("continuous"). The encoders A1, A2, B1, B2 (d_model x rank, scaled by 1/sqrt(rank)) and the
payload embedding E (n_classes x d_model, scaled by 1/sqrt(d_model)) are fixed random matrices
drawn from the task's seed.

One choice of ours (parameter `distinct_target`): in the discrete variant two context tokens
can carry the same (z1, z2) corner, and then no model can tell which payload is asked for
(for N = M = 3 that happens in about a fifth of the episodes). By default we redraw the latents
of any other token that collides with the target, so the task always has one right answer and
accuracy measures learning rather than ambiguity. The contrast sets do not depend on it.

The contrast sets (`contrast_inputs`) are the paper's (§2): for latent z1, each query
gets a positive key that shares its z1 and a negative key with a fresh z1 (a different
one), and both keys carry the same freshly drawn z2 and random payloads. Symmetrically for z2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Variant = Literal["discrete", "continuous"]
Latent = Literal["z1", "z2"]
VARIANTS: tuple[Variant, ...] = ("discrete", "continuous")
LATENTS: tuple[Latent, ...] = ("z1", "z2")


@dataclass(frozen=True)
class Episodes:
    """A batch of episodes: the model's inputs, the label and the latents behind them."""

    context: torch.Tensor  # [batch, n_context, d_model]
    query: torch.Tensor  # [batch, d_model]
    label: torch.Tensor  # [batch] payload class of the target token
    target: torch.Tensor  # [batch] index i* of the target token
    z1: torch.Tensor  # [batch, n_context, N]
    z2: torch.Tensor  # [batch, n_context, M]


@dataclass(frozen=True)
class ContrastInputs:
    """Model inputs of one contrast set: row i of every field belongs to pair i.

    `latent` is the contrasted latent; "other" is the other one.
    """

    latent: Latent
    query: torch.Tensor  # [pairs, d_model]
    positive: torch.Tensor  # [pairs, d_model] key inputs sharing the latent with the query
    negative: torch.Tensor  # [pairs, d_model] key inputs with a different value of the latent
    query_value: torch.Tensor  # [pairs, rank] the latent of the query and the positive key
    negative_value: torch.Tensor  # [pairs, rank] the latent of the negative key
    query_other: torch.Tensor  # [pairs, other rank] the query's other latent
    key_other: torch.Tensor  # [pairs, other rank] the other latent of both keys


@dataclass(frozen=True)
class PayloadTask:
    """The payload-retrieval task: sizes, latent variant and the fixed random encoders.

    Parameters
    ----------
    rank_z1, rank_z2 : int
        N and M, the dimensions of the two latents.
    variant : "discrete" or "continuous"
        Cube corners {-1, +1}^rank or Gaussian latents.
    seed : int
        Seed of the encoders A1, A2, B1, B2 and E.
    n_context, n_classes, d_model, noise
        C = 16 context tokens, P = 10 payload classes, d_model = 32, noise std 0.01 (the
        paper's settings).
    distinct_target : bool
        Redraw context tokens whose (z1, z2) equals the target's (see the module docstring).

    Examples
    --------
    >>> task = PayloadTask(rank_z1=3, rank_z2=5, variant="discrete", seed=0)
    >>> batch = task.sample(4, torch.Generator().manual_seed(0))
    >>> tuple(batch.context.shape), tuple(batch.query.shape)
    ((4, 16, 32), (4, 32))
    """

    rank_z1: int
    rank_z2: int
    variant: Variant = "discrete"
    seed: int = 0
    n_context: int = 16
    n_classes: int = 10
    d_model: int = 32
    noise: float = 0.01
    distinct_target: bool = True
    encoders: dict[str, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; use one of {VARIANTS}.")
        if min(self.rank_z1, self.rank_z2) < 1:
            raise ValueError(f"ranks must be >= 1, got N={self.rank_z1}, M={self.rank_z2}.")
        g = torch.Generator().manual_seed(self.seed)
        d = self.d_model

        def encoder(rank: int) -> torch.Tensor:
            return torch.randn(d, rank, generator=g) / rank**0.5

        encoders = {
            "A1": encoder(self.rank_z1),
            "A2": encoder(self.rank_z2),
            "B1": encoder(self.rank_z1),
            "B2": encoder(self.rank_z2),
            "E": torch.randn(self.n_classes, d, generator=g) / d**0.5,
        }
        object.__setattr__(self, "encoders", encoders)

    # -- latents and token inputs ----------------------------------------------------------

    def latents(self, shape: tuple[int, ...], rank: int, g: torch.Generator) -> torch.Tensor:
        """Latent vectors [*shape, rank] of this task's variant."""
        if self.variant == "discrete":
            return torch.randint(0, 2, (*shape, rank), generator=g).float() * 2 - 1
        return torch.randn(*shape, rank, generator=g)

    def key_inputs(
        self, z1: torch.Tensor, z2: torch.Tensor, payload: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        """Context token inputs A1 z1 + A2 z2 + E[payload] + noise."""
        e = self.encoders
        x = z1 @ e["A1"].T + z2 @ e["A2"].T + e["E"][payload]
        return x + self.noise * torch.randn(x.shape, generator=g)

    def query_inputs(self, z1: torch.Tensor, z2: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Query token inputs B1 z1 + B2 z2 + noise."""
        e = self.encoders
        x = z1 @ e["B1"].T + z2 @ e["B2"].T
        return x + self.noise * torch.randn(x.shape, generator=g)

    # -- episodes ----------------------------------------------------------------------------

    def sample(self, batch: int, g: torch.Generator) -> Episodes:
        """`batch` random episodes."""
        n, m = self.rank_z1, self.rank_z2
        z = self.latents((batch, self.n_context), n + m, g)  # z1 and z2 side by side
        target = torch.randint(0, self.n_context, (batch,), generator=g)
        if self.distinct_target and self.variant == "discrete":
            z = self._separate_from_target(z, target, g)
        z1, z2 = z[..., :n], z[..., n:]
        payload = torch.randint(0, self.n_classes, (batch, self.n_context), generator=g)
        rows = torch.arange(batch)
        context = self.key_inputs(z1, z2, payload, g)
        query = self.query_inputs(z1[rows, target], z2[rows, target], g)
        return Episodes(context, query, payload[rows, target], target, z1, z2)

    def _separate_from_target(
        self, z: torch.Tensor, target: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        """Redraw the latents [batch, C, N + M] of other tokens that equal the target's."""
        rows = torch.arange(z.shape[0])
        while True:
            clash = (z == z[rows, target][:, None]).all(-1)
            clash[rows, target] = False
            if not clash.any():
                return z
            z[clash] = self.latents((int(clash.sum()),), z.shape[-1], g)

    # -- contrast sets -----------------------------------------------------------------------

    def contrast_inputs(
        self, latent: Latent, n_contrast_pairs: int, g: torch.Generator
    ) -> ContrastInputs:
        """Queries with one positive and one negative key each, for `latent` ("z1" or "z2").

        Positive key: the query's value of `latent`. Negative key: a fresh, different value.
        Both keys: the same fresh value of the other latent, and independent random payloads.
        """
        if latent not in LATENTS:
            raise ValueError(f"latent={latent!r}; use 'z1' or 'z2'.")
        ranks = {"z1": self.rank_z1, "z2": self.rank_z2}
        other: Latent = "z2" if latent == "z1" else "z1"
        shared = self.latents(
            (n_contrast_pairs,), ranks[latent], g
        )  # the query's value of the latent
        query_other = self.latents((n_contrast_pairs,), ranks[other], g)
        fresh = self._different_latents(shared, ranks[latent], g)
        key_other = self.latents(
            (n_contrast_pairs,), ranks[other], g
        )  # held fixed across the two keys

        def with_latent(value: torch.Tensor, other_value: torch.Tensor) -> dict[str, torch.Tensor]:
            return {latent: value, other: other_value}

        def keys(value: torch.Tensor) -> torch.Tensor:
            payload = torch.randint(0, self.n_classes, (n_contrast_pairs,), generator=g)
            return self.key_inputs(**with_latent(value, key_other), payload=payload, g=g)

        query = self.query_inputs(**with_latent(shared, query_other), g=g)
        return ContrastInputs(
            latent,
            query,
            positive=keys(shared),
            negative=keys(fresh),
            query_value=shared,
            negative_value=fresh,
            query_other=query_other,
            key_other=key_other,
        )

    def _different_latents(
        self, reference: torch.Tensor, rank: int, g: torch.Generator
    ) -> torch.Tensor:
        """Fresh latents like `reference` [n, rank], redrawn wherever one equals its reference."""
        fresh = self.latents(reference.shape[:1], rank, g)
        while True:
            same = (fresh == reference).all(-1)
            if not same.any():
                return fresh
            fresh[same] = self.latents((int(same.sum()),), rank, g)
