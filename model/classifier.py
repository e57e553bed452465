"""FEVER fact-checking model: BERT encoder + one linear logit on the [CLS] state (paper 5.1, A.4)."""
import torch
from torch import nn


class BertClassifier(nn.Module):
    """BERT whose first-token final hidden state maps to one logit; sigmoid(logit) = P(SUPPORTS)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        # Named `bert` so edit-module names read bert.encoder.layer.11.output.dense.
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 1)

    @property
    def config(self):
        """The encoder's transformers config (hidden size, vocab, ...)."""
        return self.bert.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **unused) -> torch.Tensor:
        """Logits (B,) from input_ids (B, T); extra batch keys (labels, ...) are ignored."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # (B, T, d)
        return self.head(hidden[:, 0]).squeeze(-1)  # (B,)
