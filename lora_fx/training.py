"""Training a lorafied module with Hugging Face ``Trainer`` and TRL's ``SFTTrainer``.

Both trainers are written for ``PreTrainedModel``s. :class:`TrainerModule` wraps what
:func:`lora_fx.lorafy` returned with the few things they read, and nothing else::

    model = TrainerModule(lgm)          # lgm traced with input_ids, attention_mask, labels (kwargs)
    trainer = transformers.Trainer(model, args, train_dataset=ds, data_collator=collator,
                                   callbacks=[SaveAdapterCallback()])

What each piece is for:

* ``forward(input_ids, attention_mask, labels)`` calls the captured graph, which returns the model's
  own output (``CausalLMOutputWithPast(loss, logits)``: Trainer reads ``outputs["loss"]``). Inputs the
  trace did not take raise :class:`TrainingError`; ``use_cache=False`` (TRL passes it) is dropped.
* ``accepts_loss_kwargs``: True for a causal LM traced with labels (``loss_type == "ForCausalLM"``): the
  graph's loss is the mean over the micro-batch's ``n`` predicted tokens, and ``forward`` turns it into the
  sum over the whole accumulated batch (``mean * n / num_items_in_batch``), as Hugging Face's own loss
  does, so gradient accumulation weighs every token alike. Otherwise False: Trainer divides each
  micro-batch's mean loss by the accumulation steps.
* ``state_dict()`` holds the trainable tensors only (the LoRA A/B): Trainer saves a module that is not
  a ``PreTrainedModel`` as its state dict, which would be a copy of the frozen base in every checkpoint
  (and fails on tied weights: safetensors refuses shared tensors). ``resume_from_checkpoint`` loads it
  back. :class:`SaveAdapterCallback` writes the PEFT-format adapter beside it.
* ``activation_checkpointing_enable()`` (``TrainingArguments(activation_checkpointing=True)``, SFTConfig's
  default): :func:`lora_fx.checkpoint` over the model's decoder blocks (its ``_no_split_modules`` classes).
  Capture drops Hugging Face's own checkpointing, so nothing else would act on the flag.
* ``config``, ``generation_config``, ``base_model``, ``get_output_embeddings()``, ``add_model_tags``: what
  SFTTrainer reads. SFTTrainer computes its loss with a fused LM head (``trl.trainer.utils.add_fused_lm_head``:
  the backbone's last hidden state times ``lm_head.weight``, in chunks, never the full logits); ``base_model``
  is the captured graph cut before the LM head's matmul (:class:`Backbone`: same parameters, LoRA included),
  and ``get_output_embeddings()`` the frozen head. A LoRA branch on the LM head is refused there, as TRL
  refuses PEFT's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from transformers import GenerationConfig, TrainerCallback
from transformers.modeling_outputs import BaseModelOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import save_adapter
from .errors import TrainingError
from .graph_module import capture_of, copy_module, lora_state
from .loraplus import lora_module
from .passes.checkpoint import CheckpointedModule, checkpoint
from .sites import sites

__all__ = ["Backbone", "SaveAdapterCallback", "TrainerModule", "TrainingError"]

# Keyword arguments trainers pass that a captured graph has no input for, and the values that mean
# "what the capture did" (the trace runs with use_cache=False and returns no router logits).
_NEUTRAL = {"use_cache": (None, False), "output_router_logits": (None, False), "return_dict": (None, True)}


class TrainerModule(nn.Module):
    """A lorafied module as Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` expect a model (module docstring).

    Args:
        lgm: what :func:`lora_fx.lorafy` (or :func:`lora_fx.checkpoint`) returned, traced with keyword
            inputs, e.g. ``trace(model, (), {"input_ids": ids, "attention_mask": mask, "labels": ids})``.
        config: the model's ``PretrainedConfig``; default: the traced model's ``config``.
        checkpoint_blocks: module-path patterns :meth:`activation_checkpointing_enable` recomputes; default:
            the traced model's modules whose class is in its ``_no_split_modules`` (its decoder layers).
    """

    accepts_loss_kwargs = False
    main_input_name = "input_ids"

    def __init__(self, lgm: fx.GraphModule, *, config: Any = None, checkpoint_blocks=None) -> None:
        super().__init__()
        lora_state(lgm, "TrainerModule")
        cap = capture_of(lgm)
        info = getattr(lgm.graph._codegen, "pytree_info", None)
        if cap is None or info is None or not cap.kwargs or cap.args:
            raise TrainingError("TrainerModule needs a module traced with keyword inputs, e.g. lora_fx.trace(model, "
                                "(), {'input_ids': ids, 'attention_mask': mask, 'labels': ids.clone()}): trainers call "
                                "the model with keywords")
        self.graph_module = lgm
        self.source = cap.source.module if cap.source is not None else None  # not a submodule: no second copy
        self.input_names = tuple(cap.kwargs)
        self.accepts_loss_kwargs = getattr(self.source, "loss_type", None) == "ForCausalLM" and "labels" in cap.kwargs
        config = config if config is not None else getattr(self.source, "config", None)
        if config is not None:  # Trainer and TRL test hasattr(model, "config")
            self.config = config
            gen = getattr(self.source, "generation_config", None)
            self.generation_config = gen if gen is not None else GenerationConfig.from_model_config(config)
        self.checkpoint_blocks = checkpoint_blocks
        self.model_tags: list[str] = []

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "source":  # the traced model: its parameters are the graph's, never registered twice
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # -- what Trainer calls ---------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, labels=None, **inputs):
        """The captured graph on these inputs (its output: the traced model's, e.g. ``loss`` and ``logits``).

        Without ``labels`` (a graph traced with them), the loss is dropped from the output: the graph
        runs with every label ignored and its logits are returned. With ``num_items_in_batch`` (Trainer
        passes it when ``accepts_loss_kwargs``) the causal-LM mean loss becomes ``mean * n / num_items``.
        """
        num_items = inputs.pop("num_items_in_batch", None) if self.accepts_loss_kwargs else None
        no_labels = labels is None and "labels" in self.input_names and isinstance(input_ids, torch.Tensor)
        if no_labels:  # every label ignored: the logits are right, the loss (0 / 0) is dropped below
            labels = torch.full_like(input_ids, -100)
        inputs.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out = self.graph_module(**_graph_inputs(self.input_names, inputs, "TrainerModule"))
        if no_labels and isinstance(out, dict) and "loss" in out:
            out = type(out)(**{k: v for k, v in out.items() if k != "loss"})
        elif num_items is not None and isinstance(out, dict) and out.get("loss") is not None:
            out["loss"] = out["loss"] * (labels[..., 1:] != -100).sum() / num_items  # HF's shifted-label count
        return out

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The trainable tensors only (LoRA A/B), named as in ``named_parameters()``: Trainer's checkpoints
        hold the adapter, never a copy of the frozen base (see the module docstring)."""
        out = destination if destination is not None else {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[prefix + name] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads what :meth:`state_dict` saved (Trainer's ``resume_from_checkpoint`` passes strict=False)."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(params.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - params.keys())
        if strict and (missing or unexpected):
            raise TrainingError(f"TrainerModule.load_state_dict: missing {missing[:4]}, unexpected {unexpected[:4]}"
                                " (it loads the trainable tensors its state_dict() saved)")
        with torch.no_grad():
            for name in params.keys() & state_dict.keys():
                params[name].copy_(state_dict[name])
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def save_pretrained(self, path: str | os.PathLike, **_: Any):
        """Writes the PEFT-format adapter (:func:`lora_fx.save_adapter`) to the folder ``path``."""
        return save_adapter(self.graph_module, path)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False, **_: Any) -> None:
        """Recomputes the decoder blocks in backward with :func:`lora_fx.checkpoint` (non-reentrant); TRL's
        ``{"selective": True}`` picks its ``policy="selective"`` (keeps matmul and attention outputs)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        reentrant = kwargs.pop("use_reentrant", None)
        policy = "selective" if kwargs.pop("selective", False) else "full"
        if offload or reentrant or kwargs:
            asked = {**kwargs, **({"use_reentrant": True} if reentrant else {}), **({"offload": True} if offload else {})}
            raise TrainingError(f"activation checkpointing options {asked} are not supported: lora_fx.checkpoint "
                                "recomputes blocks non-reentrantly on the device; call lora_fx.checkpoint(lgm, "
                                "blocks, policy='selective') yourself for the selective policy")
        if isinstance(self.graph_module, CheckpointedModule):
            return
        blocks = self.checkpoint_blocks or _decoder_blocks(self.source)
        if isinstance(blocks, list) and every_n_layers > 1:
            blocks = blocks[::every_n_layers]
        self.graph_module = checkpoint(self.graph_module, blocks, policy=policy)
        self._modules.pop("backbone", None)  # cut again from the checkpointed graph

    gradient_checkpointing_enable = activation_checkpointing_enable  # transformers < 5.20 calls this name

    @property
    def is_gradient_checkpointing(self) -> bool:
        return isinstance(self.graph_module, CheckpointedModule)

    # -- what SFTTrainer reads ------------------------------------------------------------------------

    @property
    def base_model(self) -> Backbone:
        """The graph up to the LM head's input (built on first use, then kept as a submodule)."""
        if "backbone" not in self._modules:
            self.backbone = Backbone(self)
        return self._modules["backbone"]

    def get_output_embeddings(self) -> nn.Module:
        """The frozen LM head (a ``weight`` / ``bias`` holder reading the graph's own tensors)."""
        return self.base_model.head

    def add_model_tags(self, tags) -> None:
        self.model_tags += [t for t in ([tags] if isinstance(tags, str) else tags) if t not in self.model_tags]


class Backbone(nn.Module):
    """The captured graph cut at the input of the LM head's matmul (``h`` in ``logits = h @ W_head.T``).

    ``forward(**inputs)`` returns ``BaseModelOutput(last_hidden_state=h)``. The cut graph is a copy of the
    lorafied (or checkpointed) graph with the head, the loss and everything else past ``h`` removed; its
    parameters are the lorafied module's own (LoRA included), so training through it trains the same
    tensors. ``head`` holds the head's weight (and bias) for ``get_output_embeddings()``.

    Raises:
        TrainingError: no LM head found (no linear site at the traced model's ``get_output_embeddings()``
            path), the head carries LoRA (the fused head would skip it), or the hidden state depends on
            the labels.
    """

    def __init__(self, owner: TrainerModule) -> None:
        super().__init__()
        lgm, source = owner.graph_module, owner.source
        head_path = _head_path(source)
        site = next((s for s in sites(lgm) if s.path == head_path and s.op == "linear" and not s.transposed), None)
        if site is None:
            raise TrainingError(f"no linear LM head at {head_path!r} in the captured graph: SFTTrainer's fused "
                                "LM head needs logits = linear(h, lm_head.weight); use transformers.Trainer")
        lora = [br.key for br in lora_state(lgm, "Backbone").branches if br.site.id == site.id]
        if lora:
            raise TrainingError(f"{site.id} carries LoRA ({lora[0]}): SFTTrainer computes log-probabilities from "
                                "lm_head.weight directly (its fused LM head), so that branch would never train; "
                                f"lorafy with exclude={site.id!r}, or train with transformers.Trainer")
        view = copy_module(lgm, freeze=False, codegen=False)
        graph = view.graph
        node = next(n for n in graph.nodes if n.name == site.node)
        self.head = nn.Module()
        for role, arg in (("weight", node.args[1]), ("bias", node.args[2] if len(node.args) > 2 else None)):
            object.__setattr__(self.head, role, view.get_parameter(arg.target) if arg is not None else None)
        out = graph.output_node()
        out.args = ((node.args[0],),)
        spec = pytree.tree_structure((0,))
        graph._codegen.pytree_info = graph._codegen.pytree_info._replace(out_spec=spec)
        view._out_spec = spec
        graph.eliminate_dead_code()
        readers = {p.name: len(p.users) for p in graph.nodes if p.op == "placeholder"}
        if readers.get("labels"):
            raise TrainingError("the hidden state before the LM head depends on the labels input: SFTTrainer's "
                                "fused LM head cannot run on this graph; use transformers.Trainer")
        graph.lint()
        view.recompile()
        self.graph_module = view
        self.input_names = owner.input_names

    def forward(self, **inputs) -> BaseModelOutput:
        if "labels" in self.input_names and inputs.get("labels") is None:
            inputs["labels"] = inputs.get("input_ids")  # a placeholder no node reads (checked when cut)
        (hidden,) = self.graph_module(**_graph_inputs(self.input_names, inputs, "TrainerModule.base_model"))
        return BaseModelOutput(last_hidden_state=hidden)


class SaveAdapterCallback(TrainerCallback):
    """Writes the PEFT-format adapter (:func:`lora_fx.save_adapter`) into each checkpoint folder.

    ``output_dir/checkpoint-<step>/`` then holds ``adapter_config.json`` and ``adapter_model.safetensors``
    next to Trainer's own files: ``peft.PeftModel.from_pretrained(base, folder)`` and
    ``lora_fx.load_adapter(lgm, folder)`` load it. Only the main process writes. With ``final=True`` the
    adapter is also written to ``output_dir`` when training ends. ``saved`` lists the folders written.
    """

    def __init__(self, final: bool = False) -> None:
        self.final = final
        self.saved: list[str] = []

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._write(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.final and state.is_world_process_zero:
            self._write(model, args.output_dir)
        return control

    def _write(self, model, folder: str) -> None:
        if model is None:
            raise TrainingError("SaveAdapterCallback got no model from the trainer; pass it in callbacks=[...] of a "
                                "transformers.Trainer")
        save_adapter(lora_module(model), folder)
        self.saved.append(folder)


def _graph_inputs(names: tuple[str, ...], given: dict[str, Any], who: str) -> dict[str, Any]:
    """The captured graph's keyword inputs from what a trainer passed (see ``_NEUTRAL``)."""
    extra = [k for k, v in given.items() if k not in names and v is not None and not (k in _NEUTRAL and any(
        v is x or (isinstance(v, bool) and v == x) for x in _NEUTRAL[k]))]
    if extra:
        raise TrainingError(f"{who}: the captured graph takes {list(names)}, not {sorted(extra)}: trace the model "
                            "with those inputs too, or leave them out (SFTConfig(padding_free=False) passes no "
                            "position_ids; TrainingArguments(remove_unused_columns=True) drops dataset columns)")
    missing = [k for k in names if given.get(k) is None]
    if missing:
        raise TrainingError(f"{who}: missing input(s) {missing}; the captured graph takes {list(names)} (the data "
                            "collator must produce them; trace without an input the batches do not carry)")
    return {k: given[k] for k in names}


def _decoder_blocks(source: nn.Module | None) -> list[str]:
    classes = set(getattr(source, "_no_split_modules", None) or ())
    blocks = [name for name, m in source.named_modules() if type(m).__name__ in classes] if source else []
    if not blocks:
        raise TrainingError("activation checkpointing: cannot tell the model's blocks (no _no_split_modules "
                            "classes found); pass TrainerModule(lgm, checkpoint_blocks='*.layers.*') or call "
                            "lora_fx.checkpoint(lgm, blocks) before wrapping")
    return blocks


def _head_path(source: nn.Module | None) -> str:
    head = source.get_output_embeddings() if hasattr(source, "get_output_embeddings") else None
    path = next((n for n, m in source.named_modules() if m is head), None) if head is not None else None
    if path is None:
        raise TrainingError("SFTTrainer needs the LM head: the traced model has no get_output_embeddings() "
                            "(trace a *ForCausalLM model), or use transformers.Trainer")
    return path
