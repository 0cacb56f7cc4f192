"""Hugging Face ``transformers`` causal LMs with their loss computed by fused_ce.

::

    import fused_ce.integrations.transformers as fused_hf

    model = AutoModelForCausalLM.from_pretrained(...)
    fused_hf.apply(model)                      # in place; returns the model
    out = model(input_ids, labels=labels)      # out.loss: fused; out.logits: None
    out.loss.backward()
    model.generate(...)                        # unchanged (no labels: the stock forward)
    fused_hf.revert(model)                     # back to the stock model

**What changes.** A forward call *with* ``labels`` computes the loss with
:func:`fused_ce.linear_cross_entropy` on the hidden states that feed ``lm_head``: the
``N x V`` logits are never made (transformers' own loss makes them, an fp32 copy of
them for fp16/bf16 models, then the log-softmax and its gradient). The call returns the model's usual
output (``CausalLMOutputWithPast``, or its tuple with ``return_dict=False``) with
``loss`` set and ``logits=None`` -- with ``return_dict=False`` the tuple then has no
logits entry, as ``ModelOutput.to_tuple()`` leaves out ``None``. ``apply(model,
return_logits=True)`` also returns the logits, computed as the stock model does (``N x
V`` memory; the loss is still fused_ce's). A call without ``labels`` -- inference,
``generate`` -- is the stock forward, untouched.

**Same loss as transformers'.** The loss mirrors ``transformers.loss.loss_utils.
ForCausalLMLoss`` exactly: labels are shifted left by one with ``ignore_index``
padding the last position (or taken as given from a ``shift_labels`` keyword), rows
whose label is ``ignore_index`` (-100, or an ``ignore_index`` keyword) count for
nothing, the reduction is the mean over the counted tokens -- or, with
``num_items_in_batch`` (the Trainer's gradient accumulation), the sum divided by
``num_items_in_batch``. It is float32 whatever the model's dtype, as transformers'
(fp16/bf16 models: each block of logits is made in the model's dtype on CUDA, in fp32
on the CPU, and the loss's arithmetic is fp32). ``logits_to_keep`` keeps the same
positions.
Logit post-processing of the supported families is folded in: Gemma 2/3's
``final_logit_softcapping`` becomes ``softcap`` and Cohere's ``logit_scale`` and
Granite's ``logits_scaling`` become ``logit_scale``, both inside the kernels.

**How.** transformers 5's loss hook (``model.loss_function``) receives logits, not
hidden states, so the forward is wrapped instead, keeping the stock forward whole
(the decoder call, ``logits_to_keep``, mixture-of-experts auxiliary losses, the output
class and its other fields stay transformers' own):

* the instance's ``forward`` is wrapped; with ``labels`` it arms the head for one call;
* a forward pre-hook on ``lm_head`` takes the hidden states it is given and hands
  ``lm_head`` an empty slice of them (``[B, 0, D]``), so the stock code runs on
  ``[B, 0, V]`` logits that cost nothing;
* ``model.loss_function`` (an instance attribute, which transformers 5 supports) is
  set to a function that computes the fused loss from those hidden states; called
  outside such a forward it is transformers' ``ForCausalLMLoss`` on the logits given.

Which models: any ``transformers`` causal LM whose ``forward`` computes ``logits =
self.lm_head(...)`` once, post-processes them in one of the known ways (none, Gemma's
soft-cap, Cohere's and Granite's scales) and passes them to ``self.loss_function``,
with ``ForCausalLMLoss`` as that loss: Llama, Mistral, Mixtral, Qwen2/2.5/3 (and MoE),
Gemma, Gemma 2, Gemma 3 (text), Phi-3, Cohere, Granite, OLMo, ... ``apply`` reads the
class's ``forward`` (its syntax tree, so formatting and comments do not matter) and
refuses, with the reason, a model it was not written for -- rather than compute a
different loss than the stock model would.

Call the model (``model(...)`` or ``model.forward(...)``) as usual. ``copy.deepcopy``
and ``torch.save`` of a patched model carry the patch along (the copy uses its own
weights). Limits: one call at a time per model (the hidden states of the call in
flight are kept on the model); ``lm_head.weight`` is read after ``lm_head`` has run,
so a wrapper that shards ``lm_head`` by itself and gathers its weight only during
``lm_head``'s own forward (FSDP with ``lm_head`` as a separate unit) is not supported
-- keep it in the root unit; apply before wrapping the model (PEFT, DDP);
``torch.compile`` of the patched model is not tested. ``transformers`` is imported
by :func:`apply`, not when this module is imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linear import linear_cross_entropy
from ._model_code import LogitTransform, logit_transform

_ATTRIBUTE = "_fused_ce_head"


def _import_transformers():
    try:
        import transformers  # noqa: F401
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError as e:
        raise ImportError(
            "fused_ce.integrations.transformers needs the Hugging Face transformers package "
            f"({e}); install it with `pip install transformers` (or fused_ce's 'hf' extra)"
        ) from e
    return ForCausalLMLoss


class _FusedHead:
    """The state of one patched model: what was replaced, and the hidden states of the call in flight."""

    def __init__(self, model: nn.Module, transform: LogitTransform, stock_loss: Callable, return_logits: bool):
        self.transform = transform
        self.stock_loss = stock_loss
        self.return_logits = return_logits
        self.lm_head = model.lm_head
        # What apply replaced, to put back.
        self.instance_forward = model.__dict__.get("forward")
        self.instance_loss = model.__dict__.get("_loss_function")
        self.labels_position = _labels_position(model.forward)
        # The call in flight: armed by forward, filled by lm_head's pre-hook, used by the loss.
        self.armed = False
        self.hidden: Tensor | None = None
        self.used = False
        self.model_ref = model  # the loss reads the transform's parameters from it
        # The hook's key in lm_head's hooks, not its handle: a handle reaches the hooks
        # through a weak reference, which copy.deepcopy would share with the original.
        self.hook_id = model.lm_head.register_forward_pre_hook(self.lm_head_pre_hook).id

    # -- forward

    @property
    def wrapped_forward(self) -> Callable:
        """The forward apply wrapped: the instance's own (e.g. accelerate's hooks), else the class's.

        Looked up at each call rather than kept as a bound method, which pickle would
        restore as ``getattr(model, "forward")`` -- the patched forward itself.
        """
        if self.instance_forward is not None:
            return self.instance_forward
        return types.MethodType(type(self.model_ref).forward, self.model_ref)

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if "labels" not in kwargs and self.labels_position is not None and len(args) > self.labels_position:
            labels = args[self.labels_position]
        if labels is None or self.armed:  # no loss wanted (inference, generate); or a nested call
            return self.wrapped_forward(*args, **kwargs)
        self.armed, self.hidden, self.used = True, None, False
        try:
            output = self.wrapped_forward(*args, **kwargs)
            captured, used = self.hidden is not None or self.used, self.used
        finally:
            self.armed, self.hidden, self.used = False, None, False
        if captured and not used:
            raise RuntimeError(
                "fused_ce.integrations.transformers: the forward did not compute its loss through "
                "model.loss_function, so its loss used empty logits; revert(model) and report the model class"
            )
        return output if self.return_logits else _without_logits(output)

    def lm_head_pre_hook(self, module: nn.Module, args: tuple):
        if not self.armed or self.hidden is not None or self.used:
            return None
        (hidden,) = args
        self.hidden = hidden
        if self.return_logits:
            return None
        # [B, T, D] -> [B, 0, D] (or [K, D] -> [0, D]): the stock code after lm_head runs on empty logits.
        return (hidden.narrow(-2, 0, 0),)

    # -- the loss

    def loss_function(
        self,
        logits: Tensor | None = None,
        labels: Tensor | None = None,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """``ForCausalLMLoss``'s signature and result, from the hidden states lm_head was given."""
        hidden = self.hidden
        if hidden is None or self.used:  # not inside a fused forward: transformers' own loss
            return self.stock_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                                   **kwargs)
        self.hidden, self.used = None, True
        return fused_causal_lm_loss(
            hidden, self.lm_head.weight, labels, linear_bias=self.lm_head.bias,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, shift_labels=shift_labels,
            fused=self.transform.fused(self.model_ref),
        )


class _Forward:
    """A patched model's ``forward``: :meth:`_FusedHead.forward`, with the wrapped forward's signature.

    An object rather than a closure, so that ``copy.deepcopy`` (EMA and reference
    models) and pickling copy the patch with the model; ``__wrapped__`` gives
    ``inspect.signature`` the wrapped forward's parameters, which ``generate`` reads.
    """

    def __init__(self, head: _FusedHead):
        self.head = head

    @property
    def __wrapped__(self):
        return self.head.wrapped_forward

    def __call__(self, *args, **kwargs):
        return self.head.forward(*args, **kwargs)


def _labels_position(forward: Callable) -> int | None:
    """The index of ``labels`` among forward's positional parameters (None: keyword only / absent)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index("labels") if "labels" in positional else None


def _without_logits(output):
    """The output with ``logits=None``: a new ModelOutput of the same class, or the tuple without its logits.

    ModelOutput keeps a field set to None in its dict view, so a new instance is
    made. The tuple of ``return_dict=False`` is ``to_tuple()``: ``(loss, logits,
    ...)``, so the logits are its second entry.
    """
    if dataclasses.is_dataclass(output) and any(f.name == "logits" for f in dataclasses.fields(output)):
        return dataclasses.replace(output, logits=None)
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], Tensor):
        return output[:1] + output[2:]
    return output


def fused_causal_lm_loss(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    linear_bias: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    fused: tuple[float | None, float | None] = (None, None),
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` of ``hidden_states @ lm_head_weight.T``, without the logits.

    Args:
        hidden_states: ``(B, T, D)`` (or any ``(..., D)`` whose rows match the labels),
            the input of ``lm_head``.
        lm_head_weight: ``(V, D)``; ``linear_bias``: ``(V)`` or None.
        labels: ``(B, T)`` token ids; shifted left by one inside, the last position of
            each sequence padded with ``ignore_index`` -- unless ``shift_labels``
            (already shifted, ``(B, T)``) is given, which is then used as it is.
        num_items_in_batch: None: the mean over the counted tokens; else the sum
            divided by it (gradient accumulation).
        fused: ``(scale, softcap)``: the logits are ``softcap * tanh(scale * z / softcap)``
            of ``z = hidden_states @ W.T + b`` (None: no scale / no cap).

    Returns:
        The float32 scalar loss (as transformers' loss, which upcasts the logits).
    """
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    target = shift_labels.reshape(-1).to(x.device)
    scale, softcap = fused
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # float32 whatever the model's dtype, as transformers' loss (which upcasts the logits);
    # the logit scale inside the kernels (no copy of the hidden states).
    loss = linear_cross_entropy(
        x, lm_head_weight, target, linear_bias=linear_bias, reduction=reduction, ignore_index=ignore_index,
        softcap=softcap, logit_scale=1.0 if scale is None else scale, loss_dtype=torch.float32,
    )
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# --------------------------------------------------------------------------- public API


def apply(model: nn.Module, *, return_logits: bool = False) -> nn.Module:
    """Makes a transformers causal LM compute its training loss with fused_ce; returns ``model`` (patched in place).

    Args:
        model: a ``transformers`` ``*ForCausalLM`` model (Llama, Mistral, Qwen2, Gemma,
            Gemma 2, ...; see the module docstring for the rule), with its stock loss
            (``ForCausalLMLoss``) and an ``nn.Linear`` ``lm_head``.
        return_logits: with ``labels``, also return the logits (computed as the stock
            model does, ``N x V``); the loss is fused_ce's either way. Default False:
            ``logits`` is None. Calling ``apply`` again changes it.

    Calls without ``labels`` (inference, ``generate``) are the stock forward. Applying
    twice is the same as once; :func:`revert` undoes it.

    Raises:
        ImportError: transformers is not installed.
        NotImplementedError: a model whose forward or loss fused_ce does not know.
    """
    for_causal_lm_loss = _import_transformers()
    from transformers import PreTrainedModel

    current = model.__dict__.get(_ATTRIBUTE)
    if current is not None:
        current.return_logits = bool(return_logits)
        return model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    cls_name = type(model).__name__
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, nn.Linear) or not lm_head.weight.is_floating_point():
        raise NotImplementedError(
            f"fused_ce.integrations.transformers cannot patch {cls_name}: its lm_head must be a floating-point "
            f"torch.nn.Linear, got {type(lm_head).__name__}"
        )
    loss = model.loss_function
    if loss is not for_causal_lm_loss:
        raise NotImplementedError(
            f"fused_ce.integrations.transformers cannot patch {cls_name}: its loss_function is "
            f"{getattr(loss, '__qualname__', loss)!r}, not transformers' ForCausalLMLoss (fused_ce computes that "
            "loss only)"
        )
    transform = logit_transform(type(model))
    head = _FusedHead(model, transform, for_causal_lm_loss, bool(return_logits))
    model.forward = _Forward(head)
    model.loss_function = head.loss_function
    setattr(model, _ATTRIBUTE, head)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`apply`: the stock forward and loss again. A model that is not patched is returned as it is."""
    head = model.__dict__.get(_ATTRIBUTE)
    if head is None:
        return model
    head.lm_head._forward_pre_hooks.pop(head.hook_id, None)
    for name, saved in (("forward", head.instance_forward), ("_loss_function", head.instance_loss)):
        if saved is None:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = saved
    del model.__dict__[_ATTRIBUTE]
    head.model_ref = None
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` patched ``model`` (and :func:`revert` has not undone it)."""
    return _ATTRIBUTE in model.__dict__


__all__ = ["apply", "fused_causal_lm_loss", "is_applied", "revert"]
