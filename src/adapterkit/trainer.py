"""``transformers.Trainer`` support for methods that act during training (AdaLoRA, DyLoRA, any component with
``scheduled = True`` or an ``aux_loss``).

One callback does both halves of the training-time interface::

    from adapterkit.trainer import AdapterCallback

    trainer = Trainer(model=model, args=args, ..., callbacks=[AdapterCallback(adapters)])

* ``on_train_begin``: ``adapters.begin_training(max_steps, step=global_step)`` (so a resumed run continues the
  schedule where the checkpoint left it, and methods whose config leaves ``total_step`` open take the Trainer's);
* ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad()``): ``adapters.step()``. This is the
  Trainer's event that still sees the step's gradients, which AdaLoRA's importance scores need (``on_step_end``
  comes after ``zero_grad()``); it fires once per optimizer step, also with gradient accumulation;
* loss wrapping: while training, a forward hook on the model adds ``adapters.aux_loss()`` to the output's
  ``loss`` in training mode with grad enabled (what peft's ``AdaLoraModel.forward`` does with its orthogonality
  regularizer), so evaluation losses stay the task loss. It works with any ``Trainer`` subclass whose model
  computes the loss (``labels`` in the batch). A Trainer that computes the loss outside the model
  (``compute_loss_func``, an overridden ``compute_loss``) adds ``adapters.aux_loss()`` there instead
  (``AdapterCallback(adapters, aux_loss=False)`` then turns the hook off).

``adapterkit train`` installs the callback itself. Layering: this module sits beside the controller (it calls its
public verbs only) and is imported by the CLI, never by the library below it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .controller import Adapters

__all__ = ["AdapterCallback"]


class AdapterCallback(TrainerCallback):
    """Calls ``adapters.step()`` after every optimizer step and adds ``adapters.aux_loss()`` to the training loss.

    Args:
        adapters: the controller of the model the Trainer trains (``ak.attach(model)``).
        aux_loss: add the components' auxiliary losses to the model output's ``loss`` while training.
    """

    def __init__(self, adapters: Adapters, *, aux_loss: bool = True) -> None:
        if not isinstance(adapters, Adapters):
            raise TypeError(
                f"AdapterCallback takes the model's adapter controller (adapterkit.attach(model)), got "
                f"{type(adapters).__name__}"
            )
        self.adapters = adapters
        self.add_aux_loss = aux_loss
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        total = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self.adapters.begin_training(total, step=state.global_step)
        if self.add_aux_loss and self._hook is None:
            self._hook = self.adapters.model.register_forward_hook(self._add_aux_loss)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.adapters.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _add_aux_loss(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None
        loss = getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return None
        aux = self.adapters.aux_loss()
        if not aux.requires_grad and not aux.any():  # no component has an auxiliary loss
            return None
        output.loss = loss + aux.to(loss.dtype)
        return output
