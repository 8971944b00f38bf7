"""The metrics a run reports at the end of each epoch: one builder, so a change to them is one edit."""

from __future__ import annotations

from workers.diagnostics import noise_metrics


def epoch_metrics(
    *,
    val_acc: float,
    val_loss: float,
    epoch_loss_sum: float,
    steps_per_epoch: int,
    lr: float,
    samples: int,
    elapsed: float,
    noise: tuple[float, float, float] | list[float],
    val_acc_train_mode: float | None = None,
    test: tuple[float, float] | None = None,
    mixtures: dict[str, dict[str, float]] | None = None,
    tokens: int | None = None,
) -> dict[str, float]:
    """The epoch's finals: validation accuracy and loss (eval mode), mean training loss, the last step's
    learning rate, throughput so far (text: also the real `tokens` seen and `tokens_per_s`), BN batch-statistics noise (mean, var and count sums; absent without
    BN) and, after the last epoch, validation accuracy with batch statistics (train-mode norms) and, when the
    dataset has a test split, `test_acc` and `test_loss` on it (eval mode; reported, never used to pick); after
    the last epoch, the shares Switchable Normalization learned per layer (`mixtures`, see mixture_metrics)."""
    finals = {
        "val_acc": val_acc,
        "val_loss": val_loss,
        "train_loss": epoch_loss_sum / steps_per_epoch,
        "lr": lr,
        "images_per_s": samples / max(elapsed, 1e-9),
        **noise_metrics(*noise),
    }
    if tokens is not None:  # text: the budget counts tokens as well as samples
        finals["tokens"] = float(tokens)
        finals["tokens_per_s"] = tokens / max(elapsed, 1e-9)
    if val_acc_train_mode is not None:
        finals["val_acc_train_mode"] = val_acc_train_mode
    if test is not None:
        finals["test_acc"], finals["test_loss"] = test
    if mixtures:
        finals |= mixture_metrics(mixtures)
    return finals


MIX_PREFIX = "sn_mix/"
_LONGEST_LAYER = 40  # metric names hold 64 characters: "sn_mix/" + layer + "/mean_bn"


def mixture_metrics(mixtures: dict[str, dict[str, float]]) -> dict[str, float]:
    """`sn_mix/<layer>/<mean|var>_<in|ln|bn>`: each Switchable Normalization layer's learned shares of each
    statistic in its mean and its variance (models.hybrid_norms.switchable_mixtures); a layer whose name is
    too long for a metric name is `#<index>`."""
    out: dict[str, float] = {}
    for i, (layer, shares) in enumerate(mixtures.items()):
        name = layer if 0 < len(layer) <= _LONGEST_LAYER else f"#{i}"
        out |= {f"{MIX_PREFIX}{name}/{key}": value for key, value in shares.items()}
    return out
