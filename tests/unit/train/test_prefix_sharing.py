"""The shared layout, checked by hand: rows, positions, the mask, and which hidden state scores which token."""

import pytest
import torch

from stepdpo.train.prefix_sharing import build_shared_batch, shared_rows

# Two pairs in TRL's collated layout: rows 0-1 are prompt+chosen, rows 2-3 prompt+rejected, right-padded with 0.
# pair 0: prompt [11 12], chosen [21 22], rejected [31]
# pair 1: prompt [13],    chosen [23],    rejected [33 34]
IDS = torch.tensor([[11, 12, 21, 22],
                    [13, 23, 0, 0],
                    [11, 12, 31, 0],
                    [13, 33, 34, 0]])
ATTN = (IDS != 0).long()
COMPLETION = torch.tensor([[0, 0, 1, 1],
                           [0, 1, 0, 0],
                           [0, 0, 1, 0],
                           [0, 1, 1, 0]])
LABELS = IDS.masked_fill(COMPLETION == 0, -100)


def test_rows_pair_up_by_prompt():
    assert shared_rows(IDS, ATTN, LABELS) == ([2, 1], [2, 1], [1, 2])


def test_unshareable_batches_are_refused():
    assert shared_rows(IDS[:3], ATTN[:3], LABELS[:3]) is None  # odd number of rows
    other = IDS.clone()
    other[2, 0] = 99  # pair 0's rejected row has another prompt (as after keep_end truncation)
    assert shared_rows(other, ATTN, LABELS) is None
    shorter = LABELS.clone()
    shorter[2, 1] = 12  # pair 0's rejected row treats a prompt token as completion: prompt lengths differ
    assert shared_rows(IDS, ATTN, shorter) is None
    gap = ATTN.clone()
    gap[0, 1] = 0  # padding inside a row: not prompt-then-completion
    assert shared_rows(IDS, gap, LABELS) is None


def test_shared_rows_positions_mask_and_predictors():
    ids, pos, mask, pred_b, pred_t = build_shared_batch(IDS, ([2, 1], [2, 1], [1, 2]), None, "sdpa", None)
    # [prompt | chosen | rejected], padded to the longest pair (5)
    assert ids.tolist() == [[11, 12, 21, 22, 31], [13, 23, 33, 34, 0]]
    # the rejected step restarts where the prompt ends: pair 0 at 2, pair 1 at 1
    assert pos.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 4]]
    T, F = True, False
    assert mask[0, 0].tolist() == [
        [T, F, F, F, F],  # prompt
        [T, T, F, F, F],
        [T, T, T, F, F],  # chosen
        [T, T, T, T, F],
        [T, T, F, F, T],  # rejected: the prompt and itself, not the chosen step
    ]
    assert mask[1, 0].tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],  # chosen
        [T, F, T, F, F],  # rejected
        [T, F, T, T, F],
        [T, T, T, T, T],  # padding (never scored) sees at least itself: no all-masked softmax row
    ]
    # Completion tokens in TRL's row-major order: chosen rows (21, 22 | 23), then rejected rows (31 | 33, 34).
    # Each is scored by the hidden state before it; a rejected step's first token by the prompt's last one.
    assert list(zip(pred_b.tolist(), pred_t.tolist())) == [(0, 1), (0, 2), (1, 0), (0, 1), (1, 0), (1, 2)]
    flat = LABELS[:, 1:][LABELS[:, 1:] != -100].tolist()
    assert flat == [21, 22, 23, 31, 33, 34]


def test_sliding_window_counts_positions_not_slots():
    # window 2: a token sees keys at position distance 0 or 1. The rejected token (slot 4, position 2) sees the
    # prompt token at position 1 (slot 1) but not position 0, although slot 4 is 4 slots from slot 0.
    _, _, mask, _, _ = build_shared_batch(IDS, ([2, 1], [2, 1], [1, 2]), 2, "sdpa", None)
    assert mask[0, 0, 4].tolist() == [False, True, False, False, True]
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False]


def test_eager_gets_an_additive_mask():
    _, _, mask, _, _ = build_shared_batch(IDS, ([2, 1], [2, 1], [1, 2]), None, "eager", torch.float32)
    assert mask.dtype == torch.float32
    assert mask[0, 0, 4].tolist() == [0.0, 0.0, pytest.approx(torch.finfo(torch.float32).min),
                                      pytest.approx(torch.finfo(torch.float32).min), 0.0]
