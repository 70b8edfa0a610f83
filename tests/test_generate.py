"""KV-cached, batched generation: proven equal to the uncached reference, and its decoding rules and errors."""

import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

from labs_lib.core.config import GPTConfig
from labs_lib.data.text import EOT, encode
from labs_lib.inference.cache import KVCache, forward_cached
from labs_lib.inference.generate import (
    Decoding,
    beam_search,
    generate_ids,
    generate_text,
    load_trained,
    main,
    process_logits,
)
from labs_lib.models.gpt import GPT

PROMPTS = ["def main():\n    ", "import os", "class Point(object):\n    def __init__(self, x"]


@pytest.fixture(scope="module")
def trained(trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    return model, tokenizer, [encode(tokenizer, p) for p in PROMPTS]


def reference(model, prompt, n):
    return model.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


def one_token_word(tokenizer, ids):
    """The text of the first token of ``ids`` that encodes back to that token alone (banning the text bans the
    token), printable ASCII without backslashes (the CLI reads escapes)."""
    words = [tokenizer.decode([t]) for t in ids]
    return next(w for t, w in zip(ids, words) if w.isascii() and w.isprintable() and "\\" not in w
                and encode(tokenizer, w) == [t])


def test_cached_greedy_is_token_for_token_the_uncached_reference(trained):
    model, _, prompts = trained
    for prompt in prompts:
        assert generate_ids(model, [prompt], Decoding(60, temperature=0)) == [reference(model, prompt, 60)]


def test_cached_logits_equal_the_full_forward_at_every_step(trained):
    model, _, prompts = trained
    ids = torch.tensor([prompts[2] + reference(model, prompts[2], 20)])
    full = model(ids)[0]
    cache = KVCache(ids.size(1))
    split = len(prompts[2])
    steps = [forward_cached(model, ids[:, :split], cache, torch.arange(split)[None])]
    for t in range(split, ids.size(1)):
        steps.append(forward_cached(model, ids[:, t:t + 1], cache, torch.tensor([[t]])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == ids.size(1)


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(trained):
    model, _, prompts = trained
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths
    alone = [generate_ids(model, [p], Decoding(40, temperature=0))[0] for p in prompts]
    assert generate_ids(model, prompts, Decoding(40, temperature=0)) == alone
    penalised = Decoding(40, temperature=0, repetition_penalty=1.3)
    assert generate_ids(model, prompts, penalised) == [generate_ids(model, [p], penalised)[0] for p in prompts]
    banned = Decoding(40, temperature=0, bad_words=((alone[0][3],), (alone[1][4], alone[1][5])))
    assert generate_ids(model, prompts, banned) == [generate_ids(model, [p], banned)[0] for p in prompts]


def test_the_cache_is_allocated_once_and_refuses_to_overflow(trained):
    model, _, prompts = trained
    cache = KVCache(len(prompts[1]) + 2)
    forward_cached(model, torch.tensor([prompts[1]]), cache, torch.arange(len(prompts[1]))[None])
    buffers = [k.data_ptr() for k in cache.keys]
    forward_cached(model, torch.tensor([[5]]), cache, torch.tensor([[len(prompts[1])]]))
    assert [k.data_ptr() for k in cache.keys] == buffers and len(cache.keys) == model.config.n_layer
    assert cache.nbytes == 2 * model.config.n_layer * model.config.n_embd * cache.max_len * 4
    forward_cached(model, torch.tensor([[5]]), cache, torch.tensor([[len(prompts[1]) + 1]]))
    with pytest.raises(ValueError, match="max_len"):
        forward_cached(model, torch.tensor([[5]]), cache, torch.tensor([[len(prompts[1]) + 2]]))


def test_sampling_is_deterministic_for_a_seed_and_the_filters_reduce_to_greedy(trained):
    model, _, prompts = trained
    sampled = Decoding(30, temperature=1.0, seed=3)
    first = generate_ids(model, prompts[:2], sampled)
    assert generate_ids(model, prompts[:2], sampled) == first
    assert generate_ids(model, prompts[:2], Decoding(30, temperature=1.0, seed=4)) != first
    greedy = generate_ids(model, prompts[:2], Decoding(30, temperature=0))
    assert generate_ids(model, prompts[:2], Decoding(30, temperature=1.0, top_k=1, seed=3)) == greedy
    assert generate_ids(model, prompts[:2], Decoding(30, temperature=1.0, top_p=1e-6, seed=3)) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p_and_top_k_the_k_best():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]]))
    seen, seen_mask = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool)
    kept = process_logits(logits, seen, seen_mask, Decoding(temperature=1.0, top_p=0.75)).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]  # 0.5 + 0.3 reach 0.75; 0.5 alone does not
    kept = process_logits(logits, seen, seen_mask, Decoding(temperature=1.0, top_p=0.85)).isfinite()
    assert kept.tolist() == [[False, True, True, True, False]]  # 0.8 is short of 0.85: the 0.1 joins
    kept = process_logits(logits, seen, seen_mask, Decoding(temperature=1.0, top_k=3)).isfinite()
    assert kept.tolist() == [[False, True, True, True, False]]
    scaled = process_logits(logits, seen, seen_mask, Decoding(temperature=2.0))
    torch.testing.assert_close(scaled, logits / 2)


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0]])
    seen = torch.tensor([[0, 1, 3]])
    mask = torch.tensor([[True, True, False]])  # token 3 is padding: not penalised
    out = process_logits(logits, seen, mask, Decoding(temperature=0, repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 3.0, -2.0]]


def test_banned_tokens_are_never_generated_greedy_sampled_or_in_beams(trained):
    model, _, prompts = trained
    free = generate_ids(model, prompts, Decoding(20, temperature=0))
    banned = {t for t, _ in Counter(t for row in free for t in row).most_common(3)}  # the likeliest tokens
    words = tuple((t,) for t in sorted(banned))
    greedy = generate_ids(model, prompts, Decoding(20, temperature=0, bad_words=words))
    sampled = generate_ids(model, prompts, Decoding(20, temperature=1.0, seed=2, bad_words=words))
    beams = generate_ids(model, prompts, Decoding(20, temperature=0, num_beams=2, bad_words=words))
    for rows in (greedy, sampled, beams):
        assert all(len(row) == 20 and not banned & set(row) for row in rows), rows
    assert greedy != free


def test_a_longer_bad_word_bans_its_last_token_only_after_its_other_tokens(trained):
    seen = torch.tensor([[0, 3], [0, 3], [3, 1]])
    mask = torch.tensor([[False, True], [True, True], [True, True]])  # row 0 is left-padded: its 0 is no token
    words = ((2,), (3, 4), (0, 3, 5), (1, 0, 3, 0))  # the last one is longer than anything seen: it bans nothing
    banned = process_logits(torch.zeros(3, 6), seen, mask, Decoding(temperature=0, bad_words=words)).isinf()
    assert banned.tolist() == [[False, False, True, False, True, False],
                               [False, False, True, False, True, True],
                               [False, False, True, False, False, False]]
    model, _, prompts = trained  # a word taken from the greedy text: that text changes where the word first ends
    prompt = prompts[0]
    free = generate_ids(model, [prompt], Decoding(30, temperature=0))[0]
    word = (free[3], free[4])
    first = next(j for j in range(len(free)) if tuple((prompt + free)[len(prompt) + j - 1:][:2]) == word)
    out = generate_ids(model, [prompt], Decoding(30, temperature=0, bad_words=(word,)))[0]
    assert out[:first] == free[:first] and out[first] != free[first]
    assert all(tuple((prompt + out)[len(prompt) + j - 1:][:2]) != word for j in range(len(out)))


def test_stop_strings_and_end_of_text_end_a_row(trained):
    model, tokenizer, _ = trained
    free = generate_text(model, tokenizer, PROMPTS[0], Decoding(60, temperature=0))[0]
    stop = free[5:8]  # a string the greedy continuation is known to contain
    cut = generate_text(model, tokenizer, PROMPTS[0], Decoding(60, temperature=0, stop=(stop,)))[0]
    assert cut == free[:free.index(stop)]
    eot = tokenizer.token_to_id(EOT)
    first = generate_ids(model, [encode(tokenizer, PROMPTS[0])], Decoding(60, temperature=0))[0][3]
    ended = generate_ids(model, [encode(tokenizer, PROMPTS[0])], Decoding(60, temperature=0, eos_token_id=first))
    assert ended[0][-1] == first and len(ended[0]) <= 4 and first in ended[0]
    assert eot is not None


def test_beam_search_wide_enough_is_exhaustive_search():
    """With vocab ** (n - 1) beams nothing is pruned: the answer is the most likely of all vocab ** n sequences."""
    import itertools

    torch.manual_seed(1)
    vocab, n, prompt = 8, 3, [1, 5]
    model = GPT(GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=1, n_embd=16)).eval()
    every = torch.tensor(list(itertools.product(range(vocab), repeat=n)))
    ids = torch.cat((torch.tensor(prompt).expand(len(every), -1), every), dim=1)
    with torch.no_grad():
        log_probs = model(ids)[0].log_softmax(-1)[:, len(prompt) - 1:-1].gather(2, every[..., None]).sum((1, 2))
    best = every[log_probs.argmax()].tolist()
    assert beam_search(model, prompt, Decoding(n, temperature=0, num_beams=vocab ** (n - 1))) == best
    assert len(beam_search(model, prompt, Decoding(n, temperature=0, num_beams=2))) == n


def test_an_moe_gpt_generates_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32, n_experts=4)).eval()
    prompt = [1, 2, 3, 4]
    assert generate_ids(model, [prompt], Decoding(20, temperature=0)) == [reference(model, prompt, 20)]


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=4, temperature=0.8), "beam search does not sample"),
    (dict(temperature=1.0, top_p=1.5), "top-p must be in"),
    (dict(temperature=1.0, top_p=0.0), "top-p must be in"),
    (dict(temperature=0, top_k=5), "greedy"),
    (dict(max_new_tokens=0), "at least 1"),
    (dict(temperature=-1), "temperature"),
    (dict(bad_words=((5,), ())), "empty word, which bans nothing: drop it"),
    (dict(bad_words=((5, -1),)), r"bad_words token ids \[-1\] are not non-negative: encode the words"),
])
def test_contradictory_settings_are_refused_naming_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        Decoding(**settings).check()


def test_too_long_a_prompt_or_generation_names_the_limit_and_bad_words_the_vocabulary(trained):
    model, _, _ = trained
    vocab = model.config.vocab_size
    for d in (Decoding(5, temperature=0, bad_words=((vocab,),)), Decoding(5, temperature=0, num_beams=2,
                                                                            bad_words=((vocab,),))):
        with pytest.raises(ValueError, match=rf"\[{vocab}\] are not in the vocabulary 0..{vocab - 1}"):
            generate_ids(model, [[1, 2]], d)
    context = model.config.block_size
    with pytest.raises(ValueError, match=f"under {context} tokens"):
        generate_ids(model, [[1] * context], Decoding(5, temperature=0))
    with pytest.raises(ValueError, match=f"at most {context - 10} new tokens"):
        generate_ids(model, [[1] * 10], Decoding(context, temperature=0))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "labs_lib.generate", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_the_cli_prints_the_prompt_then_its_greedy_continuation(trained_run, trained):
    model, tokenizer, _ = trained
    result = cli("--checkpoint", trained_run, "--prompt", PROMPTS[1], "--max-new-tokens", 30, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    want = generate_text(model, tokenizer, PROMPTS[1], Decoding(30, temperature=0))[0]
    assert result.stdout.startswith(PROMPTS[1] + want)


def test_the_cli_bans_bad_words(trained_run, trained, capsys):
    model, tokenizer, _ = trained
    free = generate_ids(model, [encode(tokenizer, PROMPTS[1])], Decoding(30, temperature=0))[0]
    word = one_token_word(tokenizer, free)
    main(["--checkpoint", str(trained_run), "--prompt", PROMPTS[1], "--max-new-tokens", "30", "--temperature", "0",
          "--bad-word", word])
    want = generate_text(model, tokenizer, PROMPTS[1], Decoding(30, temperature=0,
                                                                bad_words=(tuple(encode(tokenizer, word)),)))[0]
    assert capsys.readouterr().out.startswith(PROMPTS[1] + want + "\n")
    assert want != generate_text(model, tokenizer, PROMPTS[1], Decoding(30, temperature=0))[0]


def test_the_cli_errors_are_one_clear_line(trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    for weights in (broken / "checkpoints").glob("step_*/model.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    cases = [
        (("--checkpoint", tmp_path / "nowhere"), "does not exist"),
        (("--checkpoint", broken), "cannot be read"),
        (("--checkpoint", trained_run, "--num-beams", 3, "--temperature", 0.7), "beam search does not sample"),
        (("--checkpoint", trained_run, "--top-p", 2, "--temperature", 1), "top-p must be in"),
        (("--checkpoint", trained_run, "--prompt", "x" * 400, "--temperature", 0), "shorten the prompt"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
