"""MEND as re-implemented by the paper (A.7): MALMEN's hyper-network and memory-economic training, but the
rank-one shifts S_j = -eta g~_j u~_j^T are summed (Mitchell et al. 2022) instead of solved for: the aggregation
`sum` of editor/aggregation.py, without the regulariser lambda (so editor.lambda_rel does nothing here).
The code differs in nothing else; config/editor/mend.yaml also caches every token (token: all), as the authors' MEND row.
"""
from editor.malmen import MALMEN


class MEND(MALMEN):
    """Sum of parameter shifts; no regulariser lambda."""

    name = "mend"

    def __init__(self, *args, label: str | None = None, **kwargs):
        kwargs.update(aggregation="sum", regularize=False)  # lambda does not exist here: kept out of the optimiser
        super().__init__(*args, **kwargs)
        if label is not None:  # e.g. "malmen (ablation=sum)": messages name what the user asked for
            self.label = label
