"""Pure-torch operations that run inside nnsight traces.

Everything here may be called on traced values and is shipped to NDIF *by value* (see
`qktrace.model.loading.load`, which registers this module with `nnsight.register`). So this module
imports nothing but torch, keeps no state, and works on plain tensors as well as on proxies:
the same code serves local runs, `remote="local"` and NDIF, and plain-torch callers (the toy
model) too.

Devices and precision are settled here, once, for every caller: an op moves the tensors the
client built (positions, masks, labels, bases, random draws) to the device of the activation it
meets (`near`), per call, so each layer of a model sharded across GPUs gets its own; and steps
that must stay exact run with autocast off (`exact`), since NDIF runs every request of a
half-precision model inside `torch.autocast("cuda", dtype)`, which would turn a float32 matmul
into a bfloat16 one (float64, as the sums use, autocast leaves alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from typing import Any


def near(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t on the device of the activation x it meets (a no-op where it already is)."""
    return t.to(x.device)


def exact(x: torch.Tensor) -> torch.autocast:
    """A context that computes in the dtypes given on x's device: autocast off there. Only
    torch runs inside it (no access to the model), so the model's own forward never does."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def coordinates(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates of vectors x [..., d] in an orthonormal basis [d, r]: x @ basis."""
    with exact(x):
        return x @ near(basis, x).to(x.dtype)


def swap_in_subspace(
    x_a: torch.Tensor, x_b: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange the coordinates of x_a and x_b inside span(basis); keep the rest of each.

    With c = x V: x_a + (c_b - c_a) V^T and x_b + (c_a - c_b) V^T (the paper's Fig 4).
    """
    v = near(basis, x_a).to(x_a.dtype)
    with exact(x_a):
        delta = (x_b @ v - x_a @ v) @ v.T
    return x_a + delta, x_b - delta


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the component of x [..., d] that lies in span(basis) (ablation)."""
    v = near(basis, x).to(x.dtype)
    with exact(x):
        return x - (x @ v) @ v.T


def set_coordinates(x: torch.Tensor, source: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Give x the coordinates of `source` inside span(basis) (patching); keep the rest of x."""
    v = near(basis, x).to(x.dtype)
    with exact(x):
        return x + (near(source, x) @ v - x @ v) @ v.T


def gather_heads(x: torch.Tensor, heads: list[int], positions: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, tokens, d] -> x[:, heads] at per-row token positions [batch, n] -> [batch, h, n, d]."""
    x = x[:, heads]
    index = near(positions, x)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, index)


def at_keys(values: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """values [batch, h, n, tokens] (logits, attention) at per-row key positions [batch, keys]
    -> [batch, h, n, keys]."""
    cols = near(key_index, values)[:, None, None, :]
    return values.gather(3, cols.expand(-1, values.shape[1], values.shape[2], -1))


def at_queries(values: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """values [batch, h, tokens, keys] at per-row query positions [batch, n] -> [batch, h, n, keys]."""
    rows = near(query_index, values)[:, None, :, None]
    return values.gather(2, rows.expand(-1, values.shape[1], -1, values.shape[-1]))


def attention_rows(
    q_sel: torch.Tensor,
    k: torch.Tensor,
    kv_heads: list[int],
    mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled logits and attention probabilities of selected queries over all key tokens.

    q_sel [batch, h, n_query, d]; k [batch, n_kv_heads, tokens, d]; mask as given to the
    attention function (additive float, boolean "may attend", or None for plain causal).
    Returns (logits, probs), each [batch, h, n_query, tokens]; logits exclude the mask.
    """
    query_positions = near(query_positions, k)
    with exact(k):
        keys = k[:, kv_heads].to(torch.float32)
        logits = (q_sel.to(torch.float32) @ keys.transpose(-1, -2)) * scaling
        capped = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        n_tokens = keys.shape[2]
        if mask is None:
            allowed = (
                torch.arange(n_tokens, device=k.device)[None, None, None, :]
                <= query_positions[:, None, :, None]
            )
            additive = torch.zeros_like(capped).masked_fill(~allowed, float("-inf"))
        else:
            mask = near(mask, k)
            rows = query_positions[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1])
            picked = mask.gather(2, rows)
            if picked.dtype == torch.bool:
                additive = torch.zeros(picked.shape, device=k.device).masked_fill(
                    ~picked, float("-inf")
                )
            else:
                additive = picked.to(torch.float32)
        probs = torch.softmax(capped + additive, dim=-1)
    return logits, probs


def qk_sums(q_sel: torch.Tensor, k_sel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-head, per-group float64 sums of q k^T over (query, key) pairs, one query per prompt.

    q_sel [batch, h, dq]; k_sel [batch, h, keys, dk]; weights [batch, keys, G]: a one-hot label
    per key (plain sums) or any pair weights (e.g. ±1/n, which sums ΔC directly).
    Returns [h, G, dq, dk]. Keys are summed per group first: two small contractions instead of
    one 3-operand einsum (36x faster on CPU at d_head 64).
    """
    with exact(k_sel):
        w = near(weights, k_sel).to(torch.float64)
        kg = torch.einsum("bkg,bhkj->bhgj", w, k_sel.to(torch.float64))
        return torch.einsum("bhi,bhgj->hgij", q_sel.to(torch.float64), kg)


def vector_sums(
    q_sel: torch.Tensor, k_sel: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head, per-group float64 sums of q and of k over pairs (shapes as `qk_sums`).

    Returns (q [h, G, dq], k [h, G, dk]).
    """
    with exact(k_sel):
        g = near(weights, k_sel).to(torch.float64)
        q_sum = torch.einsum("bg,bhi->hgi", g.sum(1), q_sel.to(torch.float64))
        k_sum = torch.einsum("bkg,bhkj->hgj", g, k_sel.to(torch.float64))
    return q_sum, k_sum


def label_weights(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Pair weights [batch, keys, G] from integer labels [batch, keys] and a table [L, G].

    A key labelled l >= 0 gets row l of `table`; a key labelled -1 gets zeros (no pair). Labels
    travel as int8 and the table as a few numbers, instead of a float one-hot per key.
    """
    table = near(table, labels).to(torch.float64)
    rows = torch.cat([torch.zeros_like(table[:1]), table])
    return rows[labels.long() + 1]


def scaled(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices x [..., m, n] divided by their largest |entry| and cast to `dtype`, and the
    float64 scales [..., 1, 1] to multiply back. In float16 every entry keeps a relative error
    below 2^-11 of the largest one."""
    scale = x.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float64).clamp_min(1e-300)
    return (x / scale).to(dtype), scale


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per batch row of x [batch, ...]: True where every value is finite (no NaN/inf)."""
    return x.isfinite().flatten(1).all(1)


def labelled_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    q_heads: list[int],
    kv_heads: list[int],
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    labels: torch.Tensor,
    qk_table: torch.Tensor,
    vector_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's sums for `qktrace.reduce`, from the attention call's q and k.

    q [batch, heads, tokens, d], k [batch, kv_heads, tokens, d]; one query per prompt; labels
    [batch, keys] as for `label_weights`. Returns (qk [h, G, dq, dk], q [h, 2F, dq],
    k [h, 2F, dk], finite [batch]: whether the prompt's selected q and k are all finite).
    """
    q_sel = gather_heads(q, q_heads, query_index)[:, :, 0]
    k_sel = gather_heads(k, kv_heads, key_index)
    labels = near(labels, k)
    qk = qk_sums(q_sel, k_sel, label_weights(labels, qk_table))
    q_sum, k_sum = vector_sums(q_sel, k_sel, label_weights(labels, vector_table))
    return qk, q_sum, k_sum, finite_rows(q_sel) & finite_rows(k_sel)


def edit_in_subspace(
    x_sel: torch.Tensor,
    basis: torch.Tensor,
    mode: str,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vectors x_sel [..., m, d] with their coordinates inside span(basis) edited.

    basis [..., d, r] is orthonormal and broadcasts against x_sel's leading dims (a stack of
    bases [n, 1, d, r] edits a batch [b, m, d] n ways at once -> [n, b, m, d]). With c = x V:
    "swap" (m == 2) gives each of the two vectors the other's coordinates, the
    x_a + (c_b - c_a) V^T, x_b + (c_a - c_b) V^T of `swap_in_subspace`; "ablate" sets them to
    zero (`project_out`); "patch" sets them to those of `source` [..., m, d]
    (`set_coordinates`). The component outside span(basis) is kept.
    """
    if mode not in ("swap", "ablate", "patch"):
        raise ValueError(f"Unknown edit mode {mode!r}: use 'swap', 'ablate' or 'patch'.")
    v = near(basis, x_sel).to(x_sel.dtype)
    with exact(x_sel):
        coords = x_sel @ v
        if mode == "swap":
            new = coords.flip(-2)
        elif mode == "ablate":
            new = torch.zeros_like(coords)
        else:
            if source is None:
                raise ValueError("The 'patch' edit needs `source`: the coordinates to set.")
            new = near(source, x_sel).to(x_sel.dtype) @ v
        return x_sel + (new - coords) @ v.transpose(-1, -2)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., batch, tokens, d] at per-row token positions index [batch, m] -> [..., batch, m, d]."""
    shape = (*x.shape[:-2], index.shape[-1], x.shape[-1])
    return x.gather(-2, near(index, x)[..., None].expand(shape))


def put_positions(
    x: torch.Tensor, index: torch.Tensor, values: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """x [..., batch, tokens, d] with rows index [batch, m] set to values [..., batch, m, d].

    With `inplace=True` x itself (e.g. a view of a traced key tensor) is written, so the model's
    own computation sees the new rows; otherwise a new tensor is returned. Repeated positions in
    a row must carry equal values.
    """
    full = near(index, x)[..., None].expand(values.shape)
    values = near(values, x).to(x.dtype)
    if inplace:
        return x.scatter_(-2, full, values)
    return x.expand(*values.shape[:-2], *x.shape[-2:]).scatter(-2, full, values)


def head_attention_output(
    q_h: torch.Tensor,
    k_h: torch.Tensor,
    v_h: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """One head's attention output at every token, softmax(q k^T scaling + mask) v, float32.

    q_h, k_h, v_h [batch, tokens, d] are that head's own query, key and value (its key may be
    an edited copy no other head reads); mask as `attention_rows` takes it. Returns
    [batch, tokens, d]; rows whose keys are all masked (padding queries) come out NaN.
    """
    n_tokens = q_h.shape[1]
    positions = torch.arange(n_tokens, device=q_h.device)[None, :].expand(q_h.shape[0], -1)
    _, probs = attention_rows(q_h[:, None], k_h[:, None], [0], mask, positions, scaling, softcap)
    with exact(v_h):
        return (probs @ v_h[:, None].to(torch.float32))[:, 0]


def put_head_output(output: torch.Tensor, head: int, values: torch.Tensor) -> None:
    """Write values [batch, tokens, d] into the attention output [batch, tokens, heads, d] at
    `head`, in place, where they are finite (a fully masked padding row keeps the call's own)."""
    rows = output[:, :, head]
    values = near(values, rows)
    rows.copy_(torch.where(values.isfinite(), values.to(rows.dtype), rows))


class AttentionInputs:
    """One layer's attention-function call inside a trace: `read()` gives (q, k, mask).

    Made (before the trace) by `qktrace.model.loading.Model.attention_inputs`, which knows where the
    family's call keeps q, k and the mask; `read()` is called once per trace, inside it, and its
    q and k are the call's own tensors, so an in-place write (`put_positions(..., inplace=True)`
    on a view such as ``k[:, kv_head]``) is what the softmax then sees. A plain class of this
    module, so it travels to NDIF by value with the rest of it.

    It holds the attention module's envoy and the call's name, not the call itself: `read()`
    opens the module's ``.source`` inside the trace body, which is what instruments the
    forward of the model that runs the request. On NDIF that is the server's copy, which a
    ``.source`` opened on the client before the trace never reaches (every request then fails
    with "OutOfOrderError: ... the model already ran past it").
    """

    def __init__(
        self, attention: Any, call: str, query: int, key: int, mask: int, mask_name: str
    ) -> None:
        self.attention, self.call = attention, call
        self.query, self.key, self.mask, self.mask_name = query, key, mask, mask_name

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q [batch, heads, tokens, d], k [batch, kv_heads, tokens, d], mask or None)."""
        args, kwargs = getattr(self.attention.source, self.call).inputs
        mask = args[self.mask] if len(args) > self.mask else kwargs.get(self.mask_name)
        return args[self.query], args[self.key], mask

    def read_all(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, k, v [batch, kv_heads, tokens, d], mask): `read()` and the values (the call's
        argument after k), from one look at the call's inputs."""
        args, kwargs = getattr(self.attention.source, self.call).inputs
        mask = args[self.mask] if len(args) > self.mask else kwargs.get(self.mask_name)
        value = args[self.key + 1] if len(args) > self.key + 1 else kwargs["value"]
        return args[self.query], args[self.key], value, mask

    def weights(self) -> torch.Tensor:
        """The call's attention weights [batch, heads, queries, keys] (after `read()`)."""
        return getattr(self.attention.source, self.call).output[1]

    def output(self) -> torch.Tensor:
        """The call's attention output [batch, tokens, heads, d] (after `read()`): write a
        head's slice of it in place (`put_head_output`) and the rest of the layer reads that."""
        return getattr(self.attention.source, self.call).output[0]


# A singular value below this fraction of the largest is zero to float64 rounding: the test
# never counts it (its cut-off is rounding noise too, and either can be the larger).
NUMERICAL_ZERO = 1e-10


def null_cutoffs(
    real: torch.Tensor, null: torch.Tensor, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential permutation test of `qktrace.verbs.decompose.permutation_null`.

    real [dq, dk] is ΔC, null [P, dq, dk] the ΔC of P label permutations. Component j is tested
    against the `quantile` of the permutations' largest singular value once ΔC's first j query
    and key directions are projected out; testing stops at the first component that does not
    beat its cut-off or is numerically zero (`NUMERICAL_ZERO`). Returns (singular values of ΔC
    [min(dq, dk)], cut-offs [same], NaN past the first failure), float64. Runs inside a trace (a
    remote study's null) as well as here.
    """
    real, null = real.to(torch.float64), near(null, real).to(torch.float64)
    u, s, vh = torch.linalg.svd(real, full_matrices=False)
    cutoff = torch.full_like(s, float("nan"))
    eye_q = torch.eye(real.shape[0], dtype=torch.float64, device=real.device)
    eye_k = torch.eye(real.shape[1], dtype=torch.float64, device=real.device)
    for j in range(s.shape[0]):
        left = eye_q - u[:, :j] @ u[:, :j].T
        right = eye_k - vh[:j].T @ vh[:j]
        top = torch.linalg.svdvals(left @ null @ right)[:, 0]
        cutoff[j] = torch.quantile(top, quantile)
        if s[j] <= cutoff[j] or s[j] <= NUMERICAL_ZERO * s[0]:
            break
    return s, cutoff


def head_coordinates(x_sel: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Coordinates of x_sel [batch, h, n, d] in one basis per head, bases [h, d, m], float32."""
    with exact(x_sel):
        bases = near(bases, x_sel).to(torch.float32)
        return torch.einsum("bhnd,hdm->bhnm", x_sel.to(torch.float32), bases)


def answer_scores(
    logits: torch.Tensor, last: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [batch, tokens, vocab] at each row's position `last` [batch], float32, and
    their log-softmax, both at the token ids [batch, n]: ([batch, n], [batch, n])."""
    last, ids = near(last, logits), near(ids, logits)
    with exact(logits):
        at_last = logits[torch.arange(len(last), device=logits.device), last].float()
        logprobs = torch.log_softmax(at_last, dim=-1)
    return at_last.gather(1, ids), logprobs.gather(1, ids)
