"""Fine-tuning building blocks: datasets and batches, the loss, the optimizer side of a step,
atomic checkpoints, data parallelism. The loop itself lives in the example scripts."""
from .checkpoints import CheckpointDamaged, latest_checkpoint, load_checkpoint, resume_latest, save_checkpoint
from .data import BadRow, Collator, ConversationDataset, DatasetError, assistant_labels
from .loss import causal_lm_loss_sum
from .optim import AdamW, DynamicLossScale, clip_by_global_norm, cosine_with_warmup

__all__ = ["CheckpointDamaged", "latest_checkpoint", "load_checkpoint", "resume_latest", "save_checkpoint", "BadRow", "Collator", "ConversationDataset",
           "DatasetError", "assistant_labels", "causal_lm_loss_sum", "AdamW", "DynamicLossScale",
           "clip_by_global_norm", "cosine_with_warmup"]
