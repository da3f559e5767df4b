"""Training of the toy model: AdamW on fresh batches, early stopping on a fixed validation set.

The paper trains with AdamW (lr 1e-4, weight decay 1e-2), batch 256, up to 50k steps. On a CPU
we default to lr 1e-3, which reaches the same accuracies in about a thousand steps. Every
`eval_every` steps the model is scored on a fixed validation set (drawn once, from its own
seed). Training stops as soon as the validation accuracy is perfect (nothing is left to gain),
or once it has not risen by `min_delta` for `patience` evaluations; the weights with the lowest
validation loss are kept. The default `min_delta` (0.005) is about the standard error of an
accuracy near 0.9 on 2048 episodes, so noise alone does not keep training going.

Continuous (Gaussian) latents plateau below 1: attention picks the key with the largest inner
product with the query, not the nearest one, and a long latent vector can outscore the target.
The plateau is lower the fewer latent dimensions there are (about 0.77 for N = M = 3).

Why accuracy for stopping and loss for choosing: once the right token wins, the loss keeps
falling for thousands of steps as the softmax sharpens, so a loss plateau comes late; the
accuracy plateau says the task is learnt. Among the weights seen so far, the lowest loss picks
the sharpest of them (usually the last).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from qktrace.core.deprecation import renamed_attributes
from qktrace.toy.data import Episodes, PayloadTask
from qktrace.toy.model import PayloadRetrievalHead


@dataclass(frozen=True)
class TrainedModel:
    """A trained model with the numbers that say how well it trained."""

    model: PayloadRetrievalHead
    task: PayloadTask
    val_accuracy: float
    val_loss: float
    steps: int


# `accuracy_and_loss`' name before 0.2 (`qktrace eval` is the verb `evaluate`), kept for one release
__getattr__ = renamed_attributes(__name__, {"evaluate": "accuracy_and_loss"})


def accuracy_and_loss(model: PayloadRetrievalHead, episodes: Episodes) -> tuple[float, float]:
    """(accuracy, cross-entropy loss) of `model` on `episodes`."""
    with torch.no_grad():
        logits = model(episodes.context, episodes.query)
        loss = F.cross_entropy(logits, episodes.label).item()
        accuracy = (logits.argmax(-1) == episodes.label).float().mean().item()
    return accuracy, loss


def train(
    task: PayloadTask,
    d_head: int = 16,
    *,
    seed: int = 0,
    max_steps: int = 5000,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    eval_every: int = 100,
    patience: int = 3,
    min_delta: float = 0.005,
    n_val: int = 2048,
    progress: bool = False,
) -> TrainedModel:
    """Train a `PayloadRetrievalHead` on `task` and return the best model on validation.

    Parameters
    ----------
    task : PayloadTask
    d_head : int, default 16
    seed : int, default 0
        Seeds the initial weights, the training batches and the validation set.
    max_steps, lr, weight_decay, batch_size
        AdamW settings; one fresh batch of episodes per step.
    eval_every, patience, min_delta, n_val
        Validate every `eval_every` steps on `n_val` fixed episodes; stop at accuracy 1, or
        after `patience` validations without a gain of `min_delta` over the best so far.
    progress : bool, default False
        Show a tqdm bar.

    Returns
    -------
    TrainedModel

    Examples
    --------
    >>> task = PayloadTask(rank_z1=3, rank_z2=3, seed=0)
    >>> result = train(task, d_head=8, max_steps=20, eval_every=10)
    >>> result.steps <= 20
    True
    """
    torch.manual_seed(seed)
    model = PayloadRetrievalHead(task.d_model, d_head, task.n_classes)
    val = task.sample(n_val, torch.Generator().manual_seed(10_000 + seed))
    batches = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    best_loss, best_accuracy, best_state = float("inf"), 0.0, copy.deepcopy(model.state_dict())
    top_accuracy, since_gain, step = -1.0, 0, 0
    bar = tqdm(
        total=max_steps,
        desc=f"train N={task.rank_z1} M={task.rank_z2}",
        disable=not progress,
        leave=False,
    )
    while step < max_steps:
        episodes = task.sample(batch_size, batches)
        loss = F.cross_entropy(model(episodes.context, episodes.query), episodes.label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % eval_every == 0 or step == max_steps:
            accuracy, val_loss = accuracy_and_loss(model, val)
            bar.set_postfix(val_accuracy=f"{accuracy:.3f}")
            if val_loss < best_loss:
                best_loss, best_accuracy = val_loss, accuracy
                best_state = copy.deepcopy(model.state_dict())
            if accuracy >= 1.0:
                break
            if accuracy >= top_accuracy + min_delta:
                top_accuracy, since_gain = accuracy, 0
            else:
                since_gain += 1
                if since_gain >= patience:
                    break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainedModel(
        model=model, task=task, val_accuracy=best_accuracy, val_loss=best_loss, steps=step
    )
