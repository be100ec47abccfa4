"""panther_fx.distill: the losses on pooled (batch, d) features. The recipe itself is tested in test_convert.py."""

import torch
from torch import nn

import panther_fx
from panther_fx.distill import _loss, _mask

D = torch.float64


def _tokenizer_batch(batch: int, tokens: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 2:] = 0  # padding, which must not matter for pooled features
    return {"input_ids": torch.zeros(batch, tokens, dtype=torch.long), "attention_mask": mask}


def test_pooled_features_ignore_the_token_mask():
    # batch == tokens used to broadcast the (B, S, 1) token mask against (B, 1, d) silently
    g = torch.Generator().manual_seed(0)
    for batch, tokens in ((4, 4), (4, 6)):
        hs, ht = torch.randn(batch, 8, generator=g, dtype=D), torch.randn(batch, 8, generator=g, dtype=D)
        mask = _mask(_tokenizer_batch(batch, tokens), hs)
        es, et = nn.functional.normalize(hs, dim=-1), nn.functional.normalize(ht, dim=-1)
        torch.testing.assert_close(_loss("cosine", hs, ht, mask, 0.1), (1 - (es * et).sum(-1)).mean())
        torch.testing.assert_close(_loss("mse", hs, ht, mask, 0.1), ((hs - ht) ** 2).mean())


class PooledEncoder(nn.Module):
    """Returns one (batch, d) embedding per example from a tokenizer-style batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.emb(input_ids)).mean(1)


def test_distill_runs_on_pooled_features_with_an_attention_mask():
    torch.manual_seed(0)
    teacher, student = PooledEncoder(), PooledEncoder()
    g = torch.Generator().manual_seed(1)
    batches = [{**_tokenizer_batch(4, 6), "input_ids": torch.randint(0, 10, (4, 6), generator=g)} for _ in range(4)]
    for loss in ("mse", "cosine"):
        history = panther_fx.distill(student, teacher, batches, epochs=3, lr=1e-2, loss=loss, progress=False)
        assert history[-1] < history[0]


def test_distill_restores_each_modules_own_mode():
    """Restoring the root's mode recursively put a frozen eval-mode BatchNorm back in train mode, so the
    caller's next forward changed its running statistics."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.1)).eval()
    student[1].eval()
    before = [m.training for m in (*student.modules(), *teacher.modules())]
    batches = [torch.randn(16, 8) for _ in range(2)]
    panther_fx.distill(student, teacher, batches, features=lambda out: out, progress=False)
    assert [m.training for m in (*student.modules(), *teacher.modules())] == before
