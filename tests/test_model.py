import torch

from lmlab.config import ModelConfig
from lmlab.generate import generate
from lmlab.model.gpt import GPT

CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def test_shapes_loss_and_parameter_counts():
    m = model()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init
    assert m(idx)[1] is None
    assert m.lm_head.weight is m.transformer.wte.weight  # tied: counted once
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.num_params() - m.num_params(embeddings=False) == 50 * 32 + 16 * 32


def test_changing_token_t_changes_no_logits_before_t():
    m = model()
    idx = torch.randint(0, 50, (1, 16))
    base, _ = m(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 50
        logits, _ = m(changed)
        assert torch.equal(logits[0, :t], base[0, :t])
        assert not torch.allclose(logits[0, t:], base[0, t:])


def test_kv_cache_greedy_sampling_equals_full_recompute():
    m = model()
    prompt = [1, 2, 3]
    cached = generate(m, prompt, max_new_tokens=12, temperature=0)
    ids = list(prompt)
    for _ in range(12):
        logits, _ = m(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[3:]


def test_generation_runs_past_the_context_length_and_is_seeded():
    m = model()
    a = generate(m, [7], max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    b = generate(m, [7], max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    assert len(a) == 40 and a == b
    assert all(0 <= t < 50 for t in a)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=10, dropout=0.5))
    idx = torch.randint(0, 10, (2, 8))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])


def test_a_large_vocab_is_padded_for_speed_without_changing_the_outputs():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=1500)).eval()
    assert m.lm_head.weight.shape[0] == 1536  # the next multiple of 64
    idx = torch.randint(0, 1500, (2, 8))
    logits, loss = m(idx, idx)
    assert logits.shape == (2, 8, 1500)  # padded rows never reach the logits or the loss
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 1500), idx.reshape(-1)))
