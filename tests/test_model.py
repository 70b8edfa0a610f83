"""The single-device GPT: counts against published numbers, behaviour, and the round trip through transformers."""

import math

import pytest
import torch

from labs_lib.measure.flops import mfu
from labs_lib.models.gpt import GPT, GPTConfig
from labs_lib.models.hf import export_hf, import_hf

SMALL = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)


def small_model(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL.to_dict(), **changes}))


def test_gpt2_small_parameter_count():
    with torch.device("meta"):  # no memory, no init work
        model = GPT(GPTConfig.preset("gpt2-small"))
    assert model.num_params() == 124_439_808  # what transformers' GPT2LMHeadModel reports
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


def test_num_params_counts_unique_tensors():
    model = small_model()
    assert model.lm_head.weight is model.tok_emb.weight
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}  # the tied matrix appears twice here
    assert model.num_params() == sum(unique.values())
    # and by hand: embeddings, per layer 2 LayerNorms + qkv + proj + fc + proj, final LayerNorm
    V, T, L, C = SMALL.vocab_size, SMALL.block_size, SMALL.n_layer, SMALL.n_embd
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + T * C + L * per_layer + 2 * C


def test_flops_per_token_by_hand():
    model = small_model()
    V, L, C = SMALL.vocab_size, SMALL.n_layer, SMALL.n_embd
    n = V * C + L * 12 * C * C + L * 13 * C + 2 * C  # parameters without the position embedding
    assert model.flops_per_token() == 6 * n + 12 * L * C * SMALL.block_size
    assert model.flops_per_token(seq_len=4) == 6 * n + 12 * L * C * 4
    assert mfu(model.flops_per_token(), tokens_per_s=1000.0, peak_flops=1e12) == pytest.approx(
        model.flops_per_token() * 1000.0 / 1e12)


def test_initialisation():
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.all(model.blocks[0].mlp.fc.bias == 0) and torch.all(model.ln_f.weight == 1)


def test_forward_shapes_and_initial_loss():
    model = GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64))
    idx = torch.randint(0, 512, (4, 32))
    targets = torch.randint(0, 512, (4, 32))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 512) and loss.shape == ()
    assert loss.item() == pytest.approx(math.log(512), abs=0.1)  # near-uniform predictions at init
    assert model(idx)[1] is None
    targets[:, :16] = -100  # ignored positions do not count
    expected = torch.nn.functional.cross_entropy(logits[:, 16:].reshape(-1, 512), targets[:, 16:].reshape(-1))
    torch.testing.assert_close(model(idx, targets)[1], expected)


def test_causal():
    model = small_model().eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % SMALL.vocab_size
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size=16"):
        small_model()(torch.zeros(1, 17, dtype=torch.long))


def test_generate_length_and_greedy_determinism():
    model = small_model().eval()
    prompt = torch.randint(0, SMALL.vocab_size, (2, 5))
    out = model.generate(prompt, max_new_tokens=20, temperature=0)  # runs past block_size: context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=20, temperature=0))
    # greedy = argmax of the next-token logits
    assert torch.equal(out[:, 5], model(prompt)[0][:, -1].argmax(-1))
    sampled = [model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
               for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].max() < SMALL.vocab_size
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(prompt, 20, temperature=2.0, top_k=1), out)


def test_hf_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model().eval()
    idx = torch.randint(0, SMALL.vocab_size, (3, 16))
    ours = model(idx)[0]

    export_hf(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.num_parameters() == model.num_params()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours, rtol=0, atol=1e-4)

    back = import_hf(tmp_path)
    assert back.config == model.config and back.lm_head.weight is back.tok_emb.weight
    torch.testing.assert_close(back(idx)[0], ours, rtol=0, atol=0)


def test_hf_export_needs_biases(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="bias"):
        export_hf(small_model(bias=False), tmp_path)
