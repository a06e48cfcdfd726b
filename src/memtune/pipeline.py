"""Assembling a run from a recipe, in the order of the design's data flow:

    model loaded -> base storage applied -> trainable part attached -> data tokenized -> device

`train`, `eval`, `merge` and `demo` all build their model here, so a recipe means the same model in
every command.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from .adapters import ADAPTERS, AdapterMethod, method_for_saved
from .adapters.peft_format import read_config
from .attention import apply_attention, set_kernel
from .data import TokenizedData, infer_labels, load_data, read_records
from .data.readers import Record
from .errors import ConfigError
from .memory.planning import is_planning, settle
from .models import CLASSIFICATION, default_head, load_model
from .pooling import use_mean_pooling
from .prompting import PromptClassificationTask, check_label_words
from .recipe import Recipe
from .storage import STORAGE, BaseStorage
from .tasks import TASKS, Task

log = logging.getLogger(__name__)


@dataclass
class Run:
    recipe: Recipe
    model: nn.Module
    tokenizer: object
    task: Task
    method: AdapterMethod
    storage: BaseStorage
    device: torch.device
    tokentune: object | None = None  # memtune.gradient.tokentune.TokenTune when the recipe asks for it
    classifier_init: dict | None = None  # what memtune.classifier_init did to the head (training runs)
    parallel: object | None = None  # memtune.distributed.parallel.Parallel, when the trainer set one

    @property
    def train_task(self) -> Task:
        """The task as the update rule sees it (TokenTune's two-stream forward when enabled)."""
        return self.tokentune.wrap(self.task) if self.tokentune is not None else self.task

    def forward_ctx(self) -> Callable[[], ContextManager]:
        if self.recipe.train.precision == "bf16":
            return lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def param_counts(self) -> dict:
        """Weights of the model as it was defined: a 4-bit weight counts its (out, in) elements, not
        the packed bytes that hold them (two codes per byte)."""
        seen, total, trainable = set(), 0, 0
        for module in self.model.modules():
            int_layer = getattr(module, "is_quantized_linear", False)  # memtune's INT layers (storage/int4.py)
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen or (int_layer and name in ("scales", "zeros")):  # (constants, not weights)
                    continue
                seen.add(id(p))
                shape = getattr(getattr(p, "quant_state", None), "shape", None)  # bitsandbytes: unpacked shape
                if int_layer and name == "qweight":
                    n = module.in_features * module.out_features
                else:
                    n = math.prod(shape) if shape is not None else p.numel()
                total += n
                trainable += n if p.requires_grad else 0
        return {"total": total, "trainable": trainable}

    def load_data(self, spec: str, split: str, records: list[Record] | None = None) -> TokenizedData:
        d = self.recipe.data
        # a prompt renders classification records through its template
        encode = self.task.encode if isinstance(self.task, PromptClassificationTask) else None
        return load_data(spec, task=self.recipe.task, fmt=d.format, tokenizer=self.tokenizer,
                         max_length=d.max_length, labels=d.labels, split=split, records=records, encode=encode)

    def batches(self, data: TokenizedData, batch_size: int):
        from .data import collate

        pad = self.tokenizer.pad_token_id
        for i in range(0, len(data), batch_size):
            yield to_device(collate(data.examples[i:i + batch_size], pad), self.device)

    def shared_batches(self, data: TokenizedData, batch_size: int):
        """(batch, counted) pairs of this rank's share: each run of W x batch_size examples split over
        the W ranks. A rank left without examples at the end runs an uncounted forward of one example,
        so every rank runs the same number of forwards (FSDP gathers parameters in each)."""
        from .data import collate

        world, pad = self.parallel.world, self.tokenizer.pad_token_id
        step = batch_size * world.size
        for start in range(0, len(data), step):
            mine = world.share(range(start, min(start + step, len(data))))
            picked = [data.examples[i] for i in mine] or [data.examples[start]]
            yield to_device(collate(picked, pad), self.device), bool(len(mine))

    def evaluate(self, data: TokenizedData) -> dict:
        bs = self.recipe.train.eval_batch_size or self.recipe.train.batch_size
        if self.parallel is None or not self.parallel.world.distributed:
            return self.task.evaluate(self.model, ((b, True) for b in self.batches(data, bs)), self.forward_ctx())
        return self.parallel.task(self.task).evaluate(self.model, self.shared_batches(data, bs), self.forward_ctx())


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: '{spec}' is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{spec}' requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:  # the current GPU (a distributed rank's LOCAL_RANK)
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def resolve_labels(recipe: Recipe, train_records: list[Record] | None) -> None:
    """Classification label names: from data.labels, else inferred from the training data."""
    if recipe.task != CLASSIFICATION or recipe.data.labels:
        return
    if train_records is None:
        raise ConfigError("data.labels: needed for classification when there is no data.train to infer them from")
    recipe.data.labels = infer_labels(train_records, recipe.data.train or "")


def build_run(recipe: Recipe, train_records: list[Record] | None = None,
              adapter_path: str | Path | None = None, for_training: bool = False) -> Run:
    """Model + storage + trainable part on the target device. `adapter_path` (or recipe.adapter.path)
    loads a saved artifact onto the attached method. With `for_training`, `classifier_init` runs on
    `train_records`."""
    resolve_labels(recipe, train_records)
    if recipe.prompt is not None:
        check_label_words(recipe.prompt, recipe.data.labels)
    # a prompt classifies through an LM head; adapters then treat the model as the LM it is (LoRA
    # leaves the LM head frozen and writes that task type), not as a classifier with a new head
    head = recipe.prompt.head if recipe.prompt is not None else default_head(recipe.task)
    adapter_task = head if recipe.prompt is not None else recipe.task
    storage = STORAGE.get(recipe.quantize.kind)(recipe.quantize)
    device = pick_device(recipe.train.device)
    loaded = load_model(recipe.model, recipe.task, recipe.data.labels, dtype=storage.load_dtype(), head=head,
                        quantize=lambda keep: storage.load_kwargs(keep, device),
                        pooler_replaced=recipe.pooling == "mean")
    model = loaded.model
    if loaded.stored_as and not storage.reads_int_folders:
        raise ConfigError(f"model '{recipe.model}' is stored quantized ({loaded.stored_as}): train or evaluate it "
                          f"with quantize.kind=int4 and the bits and group_size it was stored with")
    if recipe.prompt is not None:  # checks the label words against the tokenizer
        task = PromptClassificationTask(recipe.prompt, loaded.tokenizer, recipe.data.labels, recipe.data.max_length)
    else:
        task = TASKS[recipe.task].from_recipe(recipe)
    if recipe.pooling == "mean":
        use_mean_pooling(model)  # before storage and adapters: the replaced [CLS] pooler is never quantized
    storage.apply(model)
    path = adapter_path or recipe.adapter.path
    if for_training and path and recipe.classifier_init is not None:
        raise ConfigError("classifier_init with adapter.path: the loaded artifact already holds a trained head, "
                          "which the initialization would overwrite. Use one of them")
    if path and recipe.adapter.kind != "full":
        method = method_for_saved(path, adapter_task)
        wanted = ADAPTERS.get(recipe.adapter.kind)
        if type(method) is not wanted:
            file_cfg = read_config(Path(path))
            # e.g. DyLoRA saved as plain LoRA; a LongLoRA folder read as the LoRA files it holds
            if file_cfg["peft_type"] not in (wanted.peft_type, *wanted.also_reads):
                raise ConfigError(f"adapter.path: {path} holds a {file_cfg['peft_type']} adapter, but adapter.kind "
                                  f"is '{recipe.adapter.kind}'")
            method = wanted(wanted.config_from_file(file_cfg, Path(path)), adapter_task)
        # the file decides the adapter's shape; fields a method lists in `recipe_fields` (e.g. DyLoRA's
        # evaluation rank) stay as the recipe sets them
        for name in wanted.recipe_fields:
            setattr(method.config, name, getattr(recipe.adapter, name))
        recipe.adapter = method.config
    else:
        method = ADAPTERS.get(recipe.adapter.kind)(recipe.adapter, adapter_task)
    set_kernel(model, recipe.attention)  # eager attention, before an adapter copies the model's config
    method.attach(model)
    if path:
        method.load(model, Path(path))
    apply_attention(model, recipe.attention)  # the attention axis (absent: as the adapter left it)
    settle(model)  # planning only: weights an adapter made beside a 4-bit (meta) layer onto the plan's CPU
    if recipe.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        # non-reentrant checkpointing works with a frozen base (no "does not require grad" error)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if not is_planning():  # (a plan's tensors are on its fake CPU, or meta for bitsandbytes: never moved)
        model.to(device)
    storage.prepare(model, for_training)  # the layers' compute path, fixed before anything runs
    run = Run(recipe, model, loaded.tokenizer, task, method, storage, device)
    if for_training and recipe.classifier_init is not None:
        if train_records is None:
            raise ConfigError("classifier_init: needs the training data (data.train) to compute class centroids")
        run.classifier_init = init_classifier(run, train_records)
    if for_training and recipe.tokentune is not None:
        from .gradient.tokentune import TokenTune

        run.tokentune = TokenTune(recipe.tokentune, model, loaded.tokenizer.pad_token_id, recipe.task)
    return run


def init_classifier(run: Run, train_records: list[Record]) -> dict:
    """`classifier_init:`: the head's last Linear from class centroids of the first
    `examples_per_class` training examples of each class (see memtune.classifier_init)."""
    from .classifier_init import classifier_layer, first_per_class, init_classifier_from_centroids

    cfg, labels = run.recipe.classifier_init, run.recipe.data.labels
    name, layer = classifier_layer(run.model, len(labels))
    if not all(p.requires_grad for p in layer.parameters()):
        raise ConfigError(f"classifier_init: the head '{name}' does not train under adapter.kind="
                          f"{run.recipe.adapter.kind}, so its initialization would not be saved with the run "
                          f"(train it, e.g. adapter.modules_to_save=[{name.split('.')[0]}])")
    data = run.load_data(run.recipe.data.train or "train", run.recipe.data.split, train_records)
    chosen = TokenizedData(first_per_class(data.examples, cfg.examples_per_class, len(labels)), data.format,
                           data.source)
    bs = run.recipe.train.eval_batch_size or run.recipe.train.batch_size
    report = init_classifier_from_centroids(run.model, run.batches(chosen, bs), len(labels))
    log.info("classifier_init: '%s' set to class centroids (examples per class: %s); %s", report["layer"],
             dict(zip(labels, report["examples_per_class"])),
             "bias = -|mu|^2/2: nearest-centroid logits" if report["bias"] else
             "the layer has no bias, so -|mu|^2/2 is left out (dot-product logits)")
    return report


def read_train_records(recipe: Recipe) -> list[Record]:
    if not recipe.data.train:
        raise ConfigError("data.train: no training data given (set data.train=FILE)")
    return read_records(recipe.data.train, recipe.data.split)
