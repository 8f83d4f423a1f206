"""A frozen explainer's per-row memo (kdablate.components.memo): keys, invalidation, the hit-rate
switch for inputs that never repeat, and its checkpoint state."""
from __future__ import annotations

import io

import torch

from kdablate.attribution import EXPLANATIONS, Cost, Saliency
from kdablate.components import STRUCTURES
from kdablate.components.memo import KEY_BYTES, RowMemo, row_keys
from kdablate.models import build_model

K = 10


def teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn1d", {"channels": 4, "depth": 2}, (1, 40), K).eval().requires_grad_(False)


def test_keys_are_the_row_and_its_label_whatever_the_layout():
    x = torch.randn(4, 1, 40)
    y = torch.tensor([0, 1, 2, 3])
    keys = row_keys(x, y)
    assert len(set(keys)) == 4 and all(len(k) == KEY_BYTES for k in keys)
    strided = torch.randn(40, 4).t().unsqueeze(1)  # non-contiguous rows, same values as their copy
    assert row_keys(strided, y) == row_keys(strided.contiguous(), y)
    assert row_keys(x, y + 1) != keys  # the same input with another label is another entry


def test_a_batch_that_holds_a_row_twice_keeps_it_once_in_order():
    memo, rows = RowMemo(), torch.arange(12.0).view(4, 3)
    memo.add([b"a", b"b", b"a", b"c"], rows)
    assert memo.lookup([b"c", b"x", b"a"]) == ([0, 2], [2, 0])
    assert torch.equal(memo.values[[2, 0]], rows[[3, 0]])


def test_the_memo_forgets_a_changed_teacher_by_any_route():
    memo, t = RowMemo(), teacher()
    memo.follow(t, 1)
    memo.add([b"a"], torch.ones(1, K))
    memo.follow(t, 1)
    assert memo.index  # unchanged: kept
    with torch.no_grad():
        t.head.bias.add_(1.0)  # in place: a new tensor version
    memo.follow(t, 1)
    assert not memo.index
    memo.add([b"a"], torch.ones(1, K))
    memo.follow(teacher(0), 1)  # another object with other values (as after a reload of another teacher)
    assert not memo.index
    same = teacher(0)
    memo.follow(same, 1), memo.add([b"a"], torch.ones(1, K))
    t2 = teacher(0)
    memo.follow(t2, 1)  # another object with the same values: kept
    assert memo.index
    t2.head.bias.data.add_(1.0)  # .data bypasses the version counter: caught at the next epoch
    memo.follow(t2, 2)
    assert not memo.index


def test_inputs_that_never_repeat_turn_the_memo_off_from_the_third_epoch():
    fresh, repeating, t = RowMemo(), RowMemo(), teacher()
    for epoch in (1, 2, 3):
        for memo, keys in ((fresh, [f"{epoch}-{i}".encode() for i in range(100)]),
                           (repeating, [f"{i}".encode() for i in range(100)])):
            memo.follow(t, epoch)
            at, _ = memo.lookup(keys)
            memo.add([k for i, k in enumerate(keys) if i not in at], torch.zeros(100 - len(at), K))
    assert fresh.off and not fresh.index and not repeating.off and len(repeating.index) == 100


def test_the_state_round_trips_through_a_weights_only_checkpoint():
    memo, t = RowMemo(), teacher()
    memo.follow(t, 2)
    memo.add(row_keys(torch.randn(5, 1, 40), torch.arange(5)), torch.randn(5, K))
    memo.lookup([b"nothing"])
    buffer = io.BytesIO()
    torch.save(memo.state(), buffer)
    buffer.seek(0)
    back = RowMemo()
    back.load(torch.load(buffer, weights_only=True))
    assert back.index == memo.index and torch.equal(back.values, memo.values[:5])
    assert (back.digest, back.epoch, back.hits, back.looked, back.off) == (memo.digest, 2, 0, 1, False)
    back.follow(teacher(0), 2)  # the reloaded teacher: new tensors, same values
    assert len(back.index) == 5
    empty = RowMemo()
    empty.load({"memo_keys": None, "memo_values": None, "memo_digest": None, "memo_off": 1})
    assert empty.off and not empty.index


def test_only_a_deterministic_source_of_a_frozen_teacher_is_memoised():
    name = "test_memo_noisy_saliency"
    if name not in EXPLANATIONS:
        @EXPLANATIONS.register(name)
        class Noisy(Saliency):  # e.g. SmoothGrad: it would draw noise, so it must say it is deterministic
            cost = Cost.PER_CLASS

    assert not EXPLANATIONS.get(name).deterministic
    assert not STRUCTURES.build("explanation", {"explainer": "teacher", "source": name}).memoizes
    # Every registered source, other tests' plugins included: memoised exactly when it says so.
    for source in EXPLANATIONS.names():
        built = STRUCTURES.build("explanation", {"explainer": "teacher", "source": source,
                                                 "source_params": EXPLANATIONS.get(source).quick_params})
        assert built.memoizes == EXPLANATIONS.get(source).deterministic, source
    assert {n for n in EXPLANATIONS.names() if EXPLANATIONS.get(n).deterministic} >= {
        "saliency", "grad_input", "integrated_gradients", "cam", "gradcam"}
