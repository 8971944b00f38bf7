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
) -> dict[str, float]:
    """The epoch's finals: validation accuracy and loss (eval mode), mean training loss, the last step's
    learning rate, throughput so far, BN batch-statistics noise (mean, var and count sums; absent without
    BN) and, after the last epoch, validation accuracy with batch statistics (train-mode norms)."""
    finals = {
        "val_acc": val_acc,
        "val_loss": val_loss,
        "train_loss": epoch_loss_sum / steps_per_epoch,
        "lr": lr,
        "images_per_s": samples / max(elapsed, 1e-9),
        **noise_metrics(*noise),
    }
    if val_acc_train_mode is not None:
        finals["val_acc_train_mode"] = val_acc_train_mode
    return finals
