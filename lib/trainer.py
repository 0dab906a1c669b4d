"""The trainer the FineTuner uses: TRL's SFTTrainer, less the host synchronisations it makes on every pass.

TRL 1.16's SFTTrainer reads three numbers back from the GPU after every forward pass (entropy, token
accuracy, tokens; each after a gather across processes), and transformers' Trainer one more after it (the
tokens seen, gathered). Each read makes the CPU wait until the GPU has finished the pass, and then the GPU
waits while the CPU launches the next kernels; with several processes each gather is also a meeting of all
of them in the middle of a step, so every step waits for the slowest process more than once.
`QLoRATrainer` keeps those numbers on the device and reads them once, when the trainer logs (every
`logging_steps`): the logged values are the same, computed from the same per-pass sums (summed over all
processes; on the last batch of an uneven epoch TRL leaves out the samples accelerate repeats to even the
processes out, this counts them).

Two per-step walks over every module of the model are cut as well: the FLOPs count reads the model's
parameter count once (Trainer counts them at every pass), and gradient clipping is given the trainable
parameters (the adapter's) rather than every parameter of the model, outside FSDP, whose clipping needs them all.

Under FSDP2 the embedding and the output head are not gathered during training (lib/sharded_vocab.py), where
served.

Only the plain path is changed (training, negative log-likelihood loss, no custom loss function, label
smoothing or auxiliary loss); every other case is TRL's own code.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer


class QLoRATrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending_sums: list = []      # per training pass: label tokens, entropy sum, top-1 hits, tokens
        self._pending_input_tokens = None  # tokens seen since the last read (a device tensor)
        self._flop_parameters = None       # the model's parameter count without embeddings, counted once
        self._trainable = None             # (model, its parameters that train), listed once
        from lib import sharded_vocab

        # FSDP: the embedding and the head stay sharded (lib/sharded_vocab.py) for the plain loss, which computes
        # with them; installed before accelerate prepares the model
        self.sharded_vocab = self._plain_loss() and sharded_vocab.install(self.model, self.accelerator)

    def train(self, *args, **kwargs):
        self._pending_sums, self._pending_input_tokens = [], None  # nothing left from an earlier, failed call
        return super().train(*args, **kwargs)

    def _plain_loss(self) -> bool:
        return (self.compute_loss_func is None and self.label_smoother is None and not self.aux_loss_enabled
                and self.args.loss_type == "nll")

    def _plain_path(self, model, return_outputs: bool) -> bool:
        return model.training and not return_outputs and self._plain_loss()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_path(model, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        head = {"sharded_vocab": True} if self.sharded_vocab else {"fused_lm_head": True}
        outputs = model(**inputs, **head)  # TRL's chunked LM head (or ours, sharded): log-probs, no full logits
        tokens_scored = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(tokens_scored).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL: DDP averages gradients
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:  # padding-free: one row, every position a token
            tokens = inputs["position_ids"].new_full((), inputs["position_ids"].size(1))  # a fill, not a copy
        device = outputs.log_probs.device  # the batch may sit elsewhere (e.g. FSDP with the weights offloaded)
        self._pending_sums.append(torch.stack([
            value.double().to(device) for value in (outputs.label_mask.sum(), outputs.entropy.detach().sum(),
                                                     outputs.is_top1.sum(), tokens)]))
        return loss

    def floating_point_ops(self, inputs):
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_parameters  # Trainer's formula

    def _clip_grad_norm(self, model):
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU) \
                or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        if self._trainable is None or self._trainable[0] is not model:
            self._trainable = (model, [p for p in model.parameters() if p.requires_grad])
        return self.accelerator.clip_grad_norm_(self._trainable[1], self.args.max_grad_norm)

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no" or "input_ids" not in inputs:
            return super()._track_num_input_tokens(inputs)
        ids = inputs["input_ids"]
        if self.args.include_num_input_tokens_seen == "non_padding" and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif self.args.include_num_input_tokens_seen == "non_padding" and self.processing_class is not None \
                and getattr(self.processing_class, "pad_token_id", None) is not None:
            count = (ids != self.processing_class.pad_token_id).sum()
        else:
            count = ids.new_full((), ids.numel())
        count = count.to(self.args.device, torch.int64)
        self._pending_input_tokens = count if self._pending_input_tokens is None else self._pending_input_tokens + count

    def read_pending(self) -> None:
        """Move the numbers kept on the device into the trainer's state and metrics: one reduction across the
        processes and one read. Every process calls it (from log and checkpoint saving, which all make)."""
        if self._pending_input_tokens is not None:
            tokens = self.accelerator.reduce(self._pending_input_tokens, reduction="sum")
            self.state.num_input_tokens_seen += int(tokens.item())
            self._pending_input_tokens = None
        if self._pending_sums:
            rows = self.accelerator.reduce(torch.stack(self._pending_sums), reduction="sum").tolist()
            self._pending_sums = []
            metrics = self._metrics["train"]
            for scored, entropy, correct, tokens in rows:
                metrics["entropy"].append(entropy / scored if scored > 0 else 0.0)
                metrics["mean_token_accuracy"].append(correct / scored if scored > 0 else 0.0)
                self._total_train_tokens += int(tokens) // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs, start_time=None):
        self.read_pending()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self.read_pending()  # the checkpoint's trainer state counts every token trained on
        super()._save_checkpoint(model, trial)
