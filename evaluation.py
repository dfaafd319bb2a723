"""Evaluation over every image of a split exactly once, whatever the number of ranks: loss, accuracy, per-class
precision, recall and F1, and the confusion matrix."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from images import evaluation_index_batches
from plugins import forward_backward


def cross_entropy(outputs, inputs):
    return F.cross_entropy(outputs.logits.float(), inputs["labels"])


@torch.no_grad()
def evaluate(boosted, images, device, batch_size, names):
    """The metrics over every readable image of `images` (SplitImages), each counted exactly once across the
    data-parallel ranks."""
    topology = boosted.topology
    boosted.model.eval()
    index_batches = evaluation_index_batches(len(images), batch_size, topology.dp_rank, topology.dp_size,
                                             whole_batches=topology.pipeline)
    num_labels = len(names)
    confusion = torch.zeros(num_labels * num_labels, dtype=torch.float64, device=device)  # row: label, column: guess
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    last = len(images) - 1  # the padding positions past the end read copies of the last image, never counted
    clamped = [[min(position, last) for position in positions] for positions in index_batches]
    for positions, (pixel_values, labels, readable) in zip(index_batches, images.device_batches(clamped)):
        # positions rise, so the counted ones lead the batch: a slice, which the host need not wait for
        counted = int((torch.tensor(positions)[readable] <= last).sum())
        _, logits = forward_backward(boosted, {"pixel_values": pixel_values, "labels": labels}, cross_entropy,
                                     backward=False)
        if topology.holds_output:
            kept_labels, kept_logits = labels[:counted], logits[:counted].float()
            loss_sum += F.cross_entropy(kept_logits, kept_labels, reduction="sum")
            confusion += torch.bincount(kept_labels * num_labels + kept_logits.argmax(dim=-1),
                                        minlength=num_labels * num_labels)
    dist.all_reduce(confusion)
    dist.all_reduce(loss_sum)
    return classification_metrics(confusion.view(num_labels, num_labels).long().cpu(), loss_sum.item(), names)


def classification_metrics(confusion, loss_sum, names):
    count = confusion.sum().item()
    true_positives = confusion.diag().double()
    precision = true_positives / confusion.sum(dim=0).clamp(min=1)
    recall = true_positives / confusion.sum(dim=1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    per_class = {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                        "support": int(confusion[i].sum())} for i, name in enumerate(names)}
    return {"loss": loss_sum / count, "accuracy": true_positives.sum().item() / count, "num_examples": int(count),
            "per_class": per_class, "confusion_matrix": confusion.tolist()}
