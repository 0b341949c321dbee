"""Evaluation on the standard files, with the paper's prompts and decoding: the commands behind
`blip2lab eval caption | vqa | retrieval | zeroshot`, for any model `blip2lab.load` opens.

    from blip2lab.evaluation import evaluate_captions
    evaluate_captions(blip2lab.load("Salesforce/blip2-opt-2.7b-coco"), "coco_karpathy_test.json",
                      "coco/images", "runs/eval/coco-caption")

Each writes OUT/predictions.json (every item's prediction, in the task's results format) and
OUT/metrics.json, batched, with progress bars, and resumable: a killed run continues where it
stopped (evaluation.runner). The scores are `blip2lab.evaluate`'s functions; this package only
reads the files (evaluation.data), runs the model over them and records what it did.
docs/evaluation.md has the commands, the formats and the paper's numbers beside each task.
"""

from .captions import evaluate_captions
from .data import EvalInputError, read_captions, read_classes, read_vqa
from .retrieval import evaluate_retrieval
from .vqa import evaluate_vqa
from .zeroshot import evaluate_zeroshot

__all__ = ["EvalInputError", "evaluate_captions", "evaluate_vqa", "evaluate_retrieval", "evaluate_zeroshot",
           "read_captions", "read_vqa", "read_classes"]
