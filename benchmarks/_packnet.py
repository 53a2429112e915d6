"""PackNet (Avalanche's implementation) on a multi-head backbone.

Avalanche's ``PackNetModel.forward(x, task_id)`` activates the task's weight subset and then
calls ``wrappee(x)`` without the task labels, which a ``MultiTaskModule`` backbone (one head per
task) needs. :class:`TaskLabelPackNetModel` passes them on and leaves the heads unwrapped.
PackNet freezes weights with tensor hooks, which do not survive a dill checkpoint:
:func:`restore_packnet_hooks` puts them back after a resume.
"""

from __future__ import annotations

from typing import Any

from avalanche.models.packnet import PackNetModel, WeightAndBiasPackNetModule
from torch import Tensor, nn

__all__ = ["TaskLabelPackNetModel", "restore_packnet_hooks"]


class TaskLabelPackNetModel(PackNetModel):
    """``PackNetModel`` whose wrapped multi-head backbone also receives the task labels.

    Only the feature extractor is made PackNet-aware (pruned and frozen task by task); the
    task heads (the child named ``classifier``) stay ordinary modules: each head is trained by
    its own task only, and Avalanche's ``IncrementalClassifier`` must keep its ``nn.Linear``.
    """

    def __init__(self, wrappee: nn.Module, head_name: str = "classifier") -> None:
        # Skip PackNetModel.__init__, which would wrap the heads too.
        super(PackNetModel, self).__init__()
        for name, child in list(wrappee.named_children()):
            if name != head_name:
                setattr(wrappee, name, PackNetModel.wrap(child))
        self.wrappee = wrappee

    def forward(self, input: Tensor, task_id: Tensor) -> Any:  # noqa: A002 - Avalanche's name
        """Activate the weights of the batch's task, then run the backbone with its head."""
        task = int(task_id[0])
        if not bool(task_id.eq(task).all()):
            raise ValueError("PackNet needs minibatches with a single task label")
        self.activate_task(min(task, self.task_count))
        return self.wrappee(input, task_id)


def restore_packnet_hooks(model: nn.Module) -> int:
    """Re-register PackNet's gradient-freezing hooks (lost by a checkpoint); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, WeightAndBiasPackNetModule):
            module.wrappee.weight.register_hook(module._remove_gradient_hook)
            count += 1
    return count
