"""Analyses of a trained toy model, each the toy version of a figure of the paper.

- `recover_subspaces` (Fig 2): contrastive covariances of z1 and z2 from the contrast sets,
  decomposed with `qktrace.verbs.decompose.decompose`; the recovered ranks should equal (N, M)
  when the head has room for both latents (N + M < d_head).
- `pca_on_subspace` (Fig 3): queries and keys projected on the recovered z1 subspace, then
  PCA to 3 components: the corners of the cube (discrete) or a round cloud (continuous).
- `swap_interventions` (Fig 4): swap the coordinates of the attended key and a target key inside the
  recovered key subspaces of z1, z2 and both, and see where the attention goes, against
  random subspaces of the same sizes.
- `interaction_matrix` and `diagonal_dominance` (Fig 5): G = (W_Q B)^T (W_K A), the bilinear
  form q·k written in latent coordinates; diagonal when the latents get separate directions.

`analyze` runs them all on one model and returns one `xarray.Dataset` with named dims, ready to
be stacked over the grid of cells (`studies.toy`).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import xarray as xr

from qktrace.core import ops
from qktrace.core.deprecation import renamed_attributes
from qktrace.toy.data import LATENTS, Episodes, PayloadTask
from qktrace.toy.model import PayloadRetrievalHead
from qktrace.verbs import decompose as covariance

SUBSPACES = ("z1", "z2", "both")
RANDOM_SUBSPACES = tuple(f"random_{name}" for name in SUBSPACES)


# `swap_interventions`' name before 0.2 (`qktrace.intervene` is the verb), kept for one release
__getattr__ = renamed_attributes(__name__, {"intervene": "swap_interventions"})


def contrast_sums(
    model: PayloadRetrievalHead, task: PayloadTask, *, n_contrast_pairs: int = 20_000, seed: int = 0
) -> xr.Dataset:
    """Covariance sums of the model's q and k over the contrast sets of z1 and z2.

    Each latent gets `n_contrast_pairs` positive and `n_contrast_pairs` negative (query, key)
    pairs, as one head (``head=0``) and two features (``feature=["z1", "z2"]``).
    """
    g = torch.Generator().manual_seed(seed)
    sums = covariance.empty_sums([0], list(LATENTS), model.d_head)
    with torch.no_grad():
        for latent in LATENTS:
            inputs = task.contrast_inputs(latent, n_contrast_pairs, g)
            q = model.queries(inputs.query).double().numpy()
            for contrast, keys in (("positive", inputs.positive), ("negative", inputs.negative)):
                k = model.keys(keys).double().numpy()
                sums = covariance.add_pairs(sums, q, k, 0, latent, contrast)
    return sums


def recover_subspaces(
    model: PayloadRetrievalHead,
    task: PayloadTask,
    *,
    n_contrast_pairs: int = 20_000,
    threshold: float = 0.99,
    centered: bool = False,
    seed: int = 0,
) -> xr.Dataset:
    """ΔC, singular values, query/key bases and ranks of z1 and z2 (``feature`` dim).

    The result of `qktrace.verbs.decompose.decompose` for the model's single head, with the head
    dim dropped.

    Examples
    --------
    >>> from qktrace.toy.train import train
    >>> trained = train(PayloadTask(rank_z1=3, rank_z2=3, seed=0), d_head=8, max_steps=10)
    >>> sub = recover_subspaces(trained.model, trained.task, n_contrast_pairs=500)
    >>> sub["rank"].dims
    ('feature',)
    """
    sums = contrast_sums(model, task, n_contrast_pairs=n_contrast_pairs, seed=seed)
    return covariance.decompose(sums, threshold=threshold, centered=centered).isel(
        head=0, drop=True
    )


def key_bases(subspaces: xr.Dataset) -> dict[str, np.ndarray]:
    """Orthonormal key bases [d_head, r] of z1, z2 and both (the span of the two together)."""
    z1 = covariance.Subspace.from_dataset(subspaces.sel(feature="z1")).key_basis
    z2 = covariance.Subspace.from_dataset(subspaces.sel(feature="z2")).key_basis
    both = scipy.linalg.orth(np.concatenate([z1, z2], axis=1))
    return {"z1": z1, "z2": z2, "both": both}


# ------------------------------------------------------------------------------------------
# Fig 4: swap intervention


def swap_effects(
    model: PayloadRetrievalHead, episodes: Episodes, key_basis: np.ndarray, target: torch.Tensor
) -> dict[str, float]:
    """Swap key coordinates in span(`key_basis`) between the attended key and `target`.

    The attended key a is the argmax of the original attention; `target` gives one other
    context index b per episode. After the swap (``ops.swap_in_subspace``):

    - ``flip_rate``: fraction of episodes whose attention argmax is now b;
    - ``mean_attention_target_after``: mean attention weight on b;
    - ``mean_delta_p_target``: mean change of p(b | {a, b}) = softmax over the two logits.
    """
    with torch.no_grad():
        q = model.queries(episodes.query)
        k = model.keys(episodes.context)
        before = model.attention_logits(q, k)
        rows = torch.arange(k.shape[0])
        attended = before.argmax(-1)
        k_a, k_b = ops.swap_in_subspace(
            k[rows, attended], k[rows, target], torch.as_tensor(key_basis, dtype=k.dtype)
        )
        swapped = k.clone()
        swapped[rows, attended] = k_a
        swapped[rows, target] = k_b
        after = model.attention_logits(q, swapped)

        def p_target(logits: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(logits[rows, target] - logits[rows, attended])

        return {
            "flip_rate": (after.argmax(-1) == target).float().mean().item(),
            "mean_attention_target_after": torch.softmax(after, -1)[rows, target].mean().item(),
            "mean_delta_p_target": (p_target(after) - p_target(before)).mean().item(),
        }


def swap_interventions(
    model: PayloadRetrievalHead,
    task: PayloadTask,
    subspaces: xr.Dataset,
    *,
    n_episodes: int = 2000,
    n_random: int = 10,
    seed: int = 0,
) -> xr.Dataset:
    """Swap interventions in the recovered key subspaces and in random ones of the same sizes.

    The target key of each episode is a uniformly drawn context token other than the attended
    one; the same episodes and targets serve every subspace.

    Returns
    -------
    xr.Dataset
        ``flip_rate``, ``mean_attention_target_after``, ``mean_delta_p_target`` over
        ``subspace`` = z1, z2, both, random_z1, random_z2, random_both (random ones averaged over the draws), the same
        per draw as ``random_flip_rate`` etc. over (``random_subspace``, ``draw``), and
        ``subspace_size (subspace)``.
    """
    g = torch.Generator().manual_seed(seed)
    episodes = task.sample(n_episodes, g)
    with torch.no_grad():
        attended = model.attention_logits(
            model.queries(episodes.query), model.keys(episodes.context)
        ).argmax(-1)
    shift = torch.randint(1, task.n_context, (n_episodes,), generator=g)
    target = (attended + shift) % task.n_context  # any token but the attended one

    bases = key_bases(subspaces)
    metrics = ("flip_rate", "mean_attention_target_after", "mean_delta_p_target")
    recovered = {name: swap_effects(model, episodes, bases[name], target) for name in SUBSPACES}
    per_draw = {m: np.zeros((len(SUBSPACES), n_random)) for m in metrics}
    for i, name in enumerate(SUBSPACES):
        size = bases[name].shape[1]
        draws = covariance.random_subspaces(model.d_head, size, n_random, seed=seed + 1 + i)
        for j, basis in enumerate(draws):
            for m, value in swap_effects(model, episodes, basis, target).items():
                per_draw[m][i, j] = value

    data: dict[str, tuple] = {}
    for m in metrics:
        values = [recovered[name][m] for name in SUBSPACES] + list(per_draw[m].mean(1))
        data[m] = ("subspace", np.array(values))
        data[f"random_{m}"] = (("random_subspace", "draw"), per_draw[m])
    sizes = [bases[name].shape[1] for name in SUBSPACES]
    data["subspace_size"] = ("subspace", np.array(sizes + sizes))
    return xr.Dataset(
        data,
        coords={
            "subspace": list(SUBSPACES + RANDOM_SUBSPACES),
            "random_subspace": list(RANDOM_SUBSPACES),
            "draw": np.arange(n_random),
        },
    )


# ------------------------------------------------------------------------------------------
# Fig 3: PCA on the recovered z1 subspace


def pca_on_subspace(
    model: PayloadRetrievalHead,
    task: PayloadTask,
    subspaces: xr.Dataset,
    *,
    latent: str = "z1",
    n_points: int = 256,
    n_pcs: int = 3,
    seed: int = 0,
) -> xr.Dataset:
    """Queries and keys in the recovered subspace of `latent`, reduced to `n_pcs` by PCA.

    Queries are projected on the query basis and keys (the target tokens' keys, so each point
    pairs with a query) on the key basis. The two clouds are scaled to the same RMS norm,
    pooled, and one PCA is fitted to both, so queries and keys share the axes.

    Returns
    -------
    xr.Dataset
        ``pca (role, point, pc)`` with role = query/key; ``corner (role, point)``, the sign
        pattern of the latent as an integer (the cube corner in the discrete variant);
        ``pc_variance_ratio (pc)``. PCs beyond the subspace's rank are NaN.
    """
    sub = covariance.Subspace.from_dataset(subspaces.sel(feature=latent))
    episodes = task.sample(n_points, torch.Generator().manual_seed(seed))
    rows = torch.arange(n_points)
    with torch.no_grad():
        q = model.queries(episodes.query).double().numpy()
        k = model.keys(episodes.context[rows, episodes.target]).double().numpy()
    coords = [q @ sub.query_basis, k @ sub.key_basis]
    coords = [c / np.sqrt((c**2).sum(1).mean()) for c in coords]
    pooled = np.concatenate(coords)
    mean = pooled.mean(0)
    _, s, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    n = min(n_pcs, vt.shape[0])
    pca = np.full((2, n_points, n_pcs), np.nan)
    for i, c in enumerate(coords):
        pca[i, :, :n] = (c - mean) @ vt[:n].T
    explained = np.full(n_pcs, np.nan)
    explained[:n] = (s**2 / (s**2).sum())[:n]

    z = (episodes.z1 if latent == "z1" else episodes.z2)[rows, episodes.target]
    corner = ((z > 0).long() * (2 ** torch.arange(z.shape[-1]))).sum(-1).numpy()
    return xr.Dataset(
        {
            "pca": (("role", "point", "pc"), pca),
            "corner": (("role", "point"), np.stack([corner, corner])),
            "pc_variance_ratio": ("pc", explained),
        },
        coords={
            "role": ["query", "key"],
            "point": np.arange(n_points),
            "pc": np.arange(1, n_pcs + 1),
        },
    )


# ------------------------------------------------------------------------------------------
# Fig 5: interactions in latent coordinates


def latent_labels(task: PayloadTask) -> list[str]:
    """Labels of the latent coordinates: z1.0 … z1.{N-1}, z2.0 … z2.{M-1}."""
    return [f"z1.{i}" for i in range(task.rank_z1)] + [f"z2.{i}" for i in range(task.rank_z2)]


def interaction_matrix(model: PayloadRetrievalHead, task: PayloadTask) -> xr.DataArray:
    """G = (W_Q B)^T (W_K A), B = [B1 B2], A = [A1 A2]: q·k between latent directions.

    Entry (i, j) is the logit contribution of query latent coordinate i with key latent
    coordinate j. Dims ``query_latent`` and ``key_latent``, labelled by `latent_labels`.
    """
    e = task.encoders
    b = torch.cat([e["B1"], e["B2"]], dim=1)
    a = torch.cat([e["A1"], e["A2"]], dim=1)
    with torch.no_grad():
        g = (model.W_Q.weight @ b).T @ (model.W_K.weight @ a)
    labels = latent_labels(task)
    return xr.DataArray(
        g.double().numpy(),
        dims=("query_latent", "key_latent"),
        coords={"query_latent": labels, "key_latent": labels},
        name="interaction",
    )


def diagonal_dominance(g: xr.DataArray) -> dict[str, float]:
    """How much of G's squared (Frobenius) mass sits on its diagonal and in its z1/z2 blocks.

    Returns ``diagonal_fraction`` (sum of G_ii^2 over sum of G_ij^2) and ``block_fraction``
    (mass in the z1-z1 and z2-z2 blocks). 1 means the latents, or their coordinates, interact
    only with themselves; off-diagonal mass means shared directions (superposition).
    """
    values = g.values
    total = float((values**2).sum())
    latent_q = np.array([str(label).split(".")[0] for label in g["query_latent"].values])
    latent_k = np.array([str(label).split(".")[0] for label in g["key_latent"].values])
    same_block = latent_q[:, None] == latent_k[None, :]
    return {
        "diagonal_fraction": float((np.diag(values) ** 2).sum()) / total,
        "block_fraction": float((values[same_block] ** 2).sum()) / total,
    }


# ------------------------------------------------------------------------------------------
# everything for one trained model


def analyze(
    model: PayloadRetrievalHead,
    task: PayloadTask,
    *,
    n_contrast_pairs: int = 20_000,
    threshold: float = 0.99,
    n_random: int = 10,
    n_episodes: int = 2000,
    n_points: int = 256,
    pad_rank: int | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """All analyses of one trained model, as one Dataset (the grid dims are added by the caller).

    Returns
    -------
    xr.Dataset
        ``rank (latent)``, ``singular_values (latent, component)``,
        ``delta_c (latent, dq, dk)``; the `swap_interventions` variables; ``pca (role, point, pc)``,
        ``pca_corner (role, point)``, ``pc_variance_ratio (pc)``;
        ``interaction (query_latent, key_latent)`` with ``diagonal_fraction`` and
        ``block_fraction``. With `pad_rank`, the latent labels of ``interaction`` run over
        z1.0 … z1.{pad_rank-1} and z2.0 … whatever N and M (NaN where a cell has fewer), so
        that the cells of a grid stack.
    """
    subspaces = recover_subspaces(
        model, task, n_contrast_pairs=n_contrast_pairs, threshold=threshold, seed=seed
    )
    by_latent = subspaces.rename(feature="latent")
    pca = pca_on_subspace(model, task, subspaces, n_points=n_points, seed=seed + 2)
    g = interaction_matrix(model, task)
    pad = max(task.rank_z1, task.rank_z2, pad_rank or 0)
    labels = [f"z{i}.{j}" for i in (1, 2) for j in range(pad)]
    d = np.arange(model.d_head)
    return xr.Dataset(
        {
            "rank": by_latent["rank"],
            "singular_values": by_latent["singular_values"],
            "delta_c": by_latent["delta_c"].assign_coords(dq=d, dk=d),
            **swap_interventions(
                model, task, subspaces, n_episodes=n_episodes, n_random=n_random, seed=seed + 1
            ),
            "pca": pca["pca"],
            "pca_corner": pca["corner"],
            "pc_variance_ratio": pca["pc_variance_ratio"],
            "interaction": g.reindex(query_latent=labels, key_latent=labels),
            **{name: ((), value) for name, value in diagonal_dominance(g).items()},
        }
    )
