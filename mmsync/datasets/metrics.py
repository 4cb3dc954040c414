"""Top-1 classification accuracy for mmengine's evaluator."""
from typing import Dict, List, Sequence

from mmengine.evaluator import BaseMetric

from ..registry import METRICS


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-1 accuracy in percent, reported as ``accuracy/top1``.

    Reads the ``pred_label`` and ``gt_label`` of each predicted sample; one
    result per sample, so mmengine's evaluator drops the samples that a
    distributed sampler repeats to even out the ranks.
    """

    default_prefix = 'accuracy'

    def process(self, data_batch, data_samples: Sequence[Dict]) -> None:
        """Record whether each sample of a batch was classified right."""
        self.results.extend(
            bool(sample['pred_label'] == sample['gt_label'])
            for sample in data_samples)

    def compute_metrics(self, results: List[bool]) -> Dict[str, float]:
        """The percentage of right results."""
        return dict(top1=100.0 * sum(results) / len(results))
