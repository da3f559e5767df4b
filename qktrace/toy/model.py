"""The toy model: one attention head and a linear read-out, nothing else.

The last token is the query; the context tokens are keys and values. The head attends from the
query over the context with softmax(q·k / sqrt(d_head)), and a linear read-out of the attended
value predicts the payload class. There is no MLP and no residual stream, so everything the
model knows about *where* to attend lives in the bilinear form q·k = x_q^T W_Q^T W_K x_k, which
is what the contrastive covariances decompose.
"""

from __future__ import annotations

import torch
from torch import nn


class PayloadRetrievalHead(nn.Module):
    """A single attention head with a linear read-out (no biases in W_Q, W_K, W_V).

    Parameters
    ----------
    d_model : int
        Input width.
    d_head : int
        Query/key/value width.
    n_classes : int
        Payload classes of the read-out.

    Examples
    --------
    >>> model = PayloadRetrievalHead(d_model=32, d_head=16, n_classes=10)
    >>> logits = model(torch.zeros(2, 16, 32), torch.zeros(2, 32))
    >>> tuple(logits.shape)
    (2, 10)
    """

    def __init__(self, d_model: int, d_head: int, n_classes: int) -> None:
        super().__init__()
        self.d_head = d_head
        self.W_Q = nn.Linear(d_model, d_head, bias=False)
        self.W_K = nn.Linear(d_model, d_head, bias=False)
        self.W_V = nn.Linear(d_model, d_head, bias=False)
        self.readout = nn.Linear(d_head, n_classes)

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """q = W_Q x_q, [..., d_head]."""
        return self.W_Q(query)

    def keys(self, context: torch.Tensor) -> torch.Tensor:
        """k = W_K x, [..., d_head]."""
        return self.W_K(context)

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q·k / sqrt(d_head) for q [batch, d_head] over keys k [batch, n_context, d_head]."""
        return (k @ q[:, :, None])[..., 0] / self.d_head**0.5

    def forward(self, context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Payload-class logits [batch, n_classes] for context [batch, C, d_model], query [batch, d_model]."""
        attention = torch.softmax(
            self.attention_logits(self.queries(query), self.keys(context)), dim=-1
        )
        attended = (attention[:, :, None] * self.W_V(context)).sum(1)
        return self.readout(attended)
