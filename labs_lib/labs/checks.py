"""Immediate checks for the notebooks' exercises.

An unanswered exercise (``None`` or ``...``) prints a hint and lets the notebook run on, so a learner can run
everything first and come back; a wrong answer raises ``AssertionError`` with the hint; a right one says so. An
exercise may keep a stronger hint for whoever asks: ``hint("its name")`` prints it. The expected values are
computed by each lab's module (``labs_lib.labs.labNN``), out of the notebook's sight. For checks of a learner's
training code: :func:`simulate_ranks` (pretend ranks in threads) and :func:`whole_batch_reference` (one process's
loss and gradients on a tiny GPT).
"""

from __future__ import annotations

import math

_MORE: dict[str, str] = {}  # exercise name -> its stronger hint, shown by hint(name)


def check(name: str, answer, expected, rtol: float = 1e-3, hint: str = "", more: str = "") -> bool:
    """Compare a learner's answer with the expected value (numbers within ``rtol``, anything else by ==). ``hint``
    comes with a wrong or missing answer; ``more``, a stronger one, waits for ``hint(name)``."""
    if more:
        _MORE[name] = more
        hint = f"{hint} (Stuck? hint({name!r}) tells more.)".strip()
    if answer is None or answer is Ellipsis:
        print(f"⏳ {name}: not answered yet. {hint}".rstrip())
        return False
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        ok = math.isclose(answer, expected, rel_tol=rtol, abs_tol=0.0 if expected else rtol)
    else:
        ok = answer == expected
    if not ok:
        raise AssertionError(f"❌ {name}: got {answer!r}, which is not right. {hint}".rstrip())
    print(f"✅ {name}: correct ({answer!r})")
    return True


def hint(name: str) -> None:
    """Print the stronger hint of the exercise ``name`` (as its check named it)."""
    if name not in _MORE:
        known = ", ".join(repr(n) for n in _MORE) or "none yet: run an exercise's check first"
        print(f"no stronger hint for {name!r}; exercises with one: {known}")
        return
    print(f"💡 {name}: {_MORE[name]}")


def simulate_ranks(fn, world_size: int = 2, timeout: float = 10.0) -> list:
    """Run ``fn(rank, all_reduce)`` for every rank of a pretend process group, in threads of this process, and
    return what each returned (rank order). ``all_reduce(tensor)`` blocks until every rank has called it and gives
    each the sum of all ranks' tensors (kept in a list, summed with ``sum`` in rank order), like a real all-reduce.

    For checking an exercise in the kernel without processes; a rank that never reaches a collective the others
    wait in makes them fail after ``timeout`` seconds instead of hanging."""
    import threading

    posted: list = [None] * world_size
    barrier = threading.Barrier(world_size, timeout=timeout)
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def all_reduce_for(rank: int):
        def all_reduce(tensor):
            posted[rank] = tensor
            barrier.wait()  # every rank has posted its tensor
            total = sum(posted[1:], posted[0])
            barrier.wait()  # every rank has read the list before the next collective overwrites it
            return total
        return all_reduce

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, all_reduce_for(rank))
        except threading.BrokenBarrierError:
            pass  # another rank failed or never came: its error is the one to report
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the caller's thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if barrier.broken:
        raise RuntimeError(f"the simulated ranks did not all reach the same collective within {timeout} s: every "
                           "rank must call all_reduce the same number of times")
    return results


def whole_batch_reference(cfg=None, batch: int = 8):
    """What a check of a learner's training step compares with: a tiny GPT (seed 0), a batch ``(x, y)`` (``y`` is
    ``x`` shifted by one), and one process's loss and gradients from one backward on the whole batch. The model comes
    back untouched (no ``.grad``): the reference is computed on a copy. Returns ``(model, x, y, loss, gradients)``."""
    import copy

    import torch

    from labs_lib.core.config import GPTConfig
    from labs_lib.models.gpt import GPT

    cfg = cfg or GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    one_process = copy.deepcopy(model)
    loss = one_process(x, y)[1]
    loss.backward()
    return model, x, y, loss.item(), {n: p.grad for n, p in one_process.named_parameters()}
