"""The head's loss in training (lmlab/model/loss.py): for a large vocabulary computed chunk by chunk, the same loss
and gradients as the plain cross-entropy over the whole logits, for every model option that touches the head, and
never a tensor as large as the (B, T, vocab) logits."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.core.config import ModelConfig
from lmlab.core.cpu_caches import UNKNOWN_L2, l2_bytes
from lmlab.model import build_model
from lmlab.model.loss import CHUNK_BYTES, IGNORE, chunk_rows, chunked, head_loss, next_token_loss

B, T, VOCAB = 3, 16, 2000  # a vocabulary the GPT pads to 2,048: the padding columns are masked, never cut off
OPTIONS = {"gpt2": {}, "untied": {"tie_embeddings": False}, "modern": {"pos_emb": "rope", "norm": "rmsnorm",
           "mlp": "swiglu", "qk_norm": True, "bias": False}, "bigram": {"bigram_buckets": 512},
           "recurrent": {"kind": "recurrent"}, "recurrent untied": {"kind": "recurrent", "tie_embeddings": False}}


def model_and_batch(options: dict, batch: int = B) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=VOCAB, **options))
    x = torch.randint(0, VOCAB, (batch, T))
    y = x.roll(-1, 1)
    y[0, :5] = IGNORE  # a fine-tuning prompt's targets
    return model, x, y


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_bytes: int | None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the gradients by chunks of at most `chunk_bytes` of logits, or (None) by the plain path: the
    whole logits, cut to the vocabulary, and torch's cross-entropy over them."""
    model.zero_grad()
    hidden = model.hidden(x)
    if chunk_bytes is None:
        loss = next_token_loss(model.lm_head(hidden)[..., :VOCAB], y)
    else:
        logits, loss = head_loss(model.lm_head, hidden, y, VOCAB, training=True, chunk_bytes=chunk_bytes)
        assert logits is None  # never written
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def same(got: tuple[torch.Tensor, dict[str, torch.Tensor]], want: tuple[torch.Tensor, dict[str, torch.Tensor]]
         ) -> None:
    torch.testing.assert_close(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name, grad in got[1].items():
        torch.testing.assert_close(grad, want[1][name], msg=name)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_chunked_loss_and_its_gradients_are_the_plain_ones(options):
    """In one chunk, in chunks of 5 rows (the last one of 3), and through the model's own forward in training."""
    model, x, y = model_and_batch(options)
    plain = loss_and_grads(model, x, y, None)
    padded = model.lm_head.weight.size(0)
    for chunk_bytes in (CHUNK_BYTES, 5 * padded * 4):
        same(loss_and_grads(model, x, y, chunk_bytes), plain)
        padding = model.lm_head.weight.grad[VOCAB:]
        assert not padding.any()  # the padding rows learn nothing
    model.zero_grad()
    logits, loss = model(x, y)
    loss.backward()
    assert logits is None
    same((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}), plain)


def test_under_bf16_autocast_the_chunked_loss_is_the_plain_one_within_bf16s_rounding():
    model, x, y = model_and_batch({})
    with torch.autocast("cpu", torch.bfloat16):
        loss, grads = loss_and_grads(model, x, y, 7 * 2048 * 4)
        want, wanted = loss_and_grads(model, x, y, None)
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    for name, grad in grads.items():
        assert (grad - wanted[name]).norm() <= 0.02 * wanted[name].norm(), name


def test_without_gradients_a_forward_gives_the_logits_and_the_same_loss():
    model, x, y = model_and_batch({})
    with torch.no_grad():
        logits, loss = model(x, y)
    assert logits.shape == (B, T, VOCAB)
    torch.testing.assert_close(loss, loss_and_grads(model, x, y, CHUNK_BYTES)[0])


def test_all_targets_ignored_give_a_nan_loss_as_the_plain_path_does():
    model, x, y = model_and_batch({})
    y[:] = IGNORE
    assert model(x, y)[1].isnan() and next_token_loss(model(x)[0], y).isnan()


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["gpt", "recurrent"])
def test_a_training_step_never_holds_a_tensor_of_the_whole_logits(kind):
    model, x, y = model_and_batch({"kind": kind}, batch=8)
    logits = 8 * T * VOCAB
    largest = {}
    for chunk_bytes in (None, 16 * 2048 * 4):
        with LargestTensor() as seen:
            loss_and_grads(model, x, y, chunk_bytes)
        largest[chunk_bytes] = seen.largest
    assert largest[None] >= logits  # the measure sees the plain path's logits
    # a chunk of them at a time: the largest tensor is the gradient of the head's weight
    assert max(largest.values()) == largest[None] and largest[16 * 2048 * 4] <= model.lm_head.weight.numel() < logits


def test_only_a_large_vocabulary_is_chunked():
    # a character-level vocabulary's logits are small: the plain path, with torch's fused cross-entropy
    assert not chunked(65) and not chunked(1024) and chunked(1025) and chunked(50257)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=65))
    x = torch.randint(0, 65, (2, 8))
    assert model(x, x)[0].shape == (2, 8, 65)


@pytest.mark.slow
def test_the_chunked_loss_compiles_whole_and_trains_as_eager():
    """Dynamo traces the chunk loop and its backward (aot_eager: as inductor's autograd tracing does) with no graph
    break: fullgraph would raise on one."""
    model, x, y = model_and_batch({})
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad()
    loss = compiled(x, y)[1]
    loss.backward()
    same((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}),
         loss_and_grads(model, x, y, CHUNK_BYTES))


def test_a_chunk_stays_within_the_cores_l2_where_that_holds_half_a_width_of_rows_else_within_its_memory_bound():
    """As few even chunks as the bound allows, covering every row; the L2's bound (`near`: an eager CPU step's) where
    it holds at least half `width` rows, whose passes in cache then pay for a chunk's weight-gradient pass, else the
    memory's alone; a memory bound smaller than an L2 still caps it."""
    for rows, vocab, width, near, chunk_bytes in itertools.product([1, 7, 4096, 16384], [1025, 4160, 50304],
                                                                   [32, 192, 768, 4096], [0, 2**20, 2**22, 2**26],
                                                                   [CHUNK_BYTES, 2**23]):
        got = chunk_rows(rows, vocab, width, chunk_bytes, near)
        limit = min(chunk_bytes, near) if 2 * (near // (4 * vocab)) >= width else chunk_bytes
        most = max(1, limit // (4 * vocab))  # rows within the bound (one at least)
        chunks = -(-rows // got)
        assert 1 <= got <= most and got <= rows
        assert (chunks - 1) * most < rows  # no fewer chunks would do
        assert chunks * got - rows < chunks  # even: the last short of the others by less than a row a chunk


def test_the_l2_is_read_as_linux_lists_a_cores_caches_and_a_common_size_where_it_is_not(tmp_path):
    def cache(folder, *levels):
        for n, (level, kind, size) in enumerate(levels):
            (folder / f"index{n}").mkdir(parents=True)
            for name, text in (("level", level), ("type", kind), ("size", size)):
                (folder / f"index{n}" / name).write_text(f"{text}\n")
        return folder

    l1 = [("1", "Data", "48K"), ("1", "Instruction", "64K")]
    assert l2_bytes(cache(tmp_path / "xeon", *l1, ("2", "Unified", "2048K"), ("3", "Unified", "491520K"))) == 2**21
    assert l2_bytes(cache(tmp_path / "epyc", *l1, ("2", "Unified", "1M"))) == 2**20
    assert l2_bytes(cache(tmp_path / "none", *l1)) == UNKNOWN_L2  # no L2 listed
    assert l2_bytes(tmp_path / "absent") == UNKNOWN_L2  # macOS, a container without /sys
    assert l2_bytes(cache(tmp_path / "garbled", ("2", "Unified", "lots"))) == UNKNOWN_L2
    assert l2_bytes() >= 2**14  # this machine's, read or not
