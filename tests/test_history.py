"""Recent moves: what counts as a ping-pong, and which pages are held back."""

from __future__ import annotations

import numpy as np

from tierd.history import MoveHistory
from tierd.vocabulary import Direction


def pfns(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_a_move_back_within_the_window_is_a_reversal_a_move_onward_is_not() -> None:
    history = MoveHistory(window=3)
    history.record(pfns(10, 11, 12), Direction.PROMOTE)
    assert history.reversals(pfns(10, 12, 13), Direction.DEMOTE) == 2
    assert history.reversals(pfns(10, 12), Direction.PROMOTE) == 0  # tier 2 -> 1 -> 0
    history.advance()
    history.advance()
    assert history.reversals(pfns(10), Direction.DEMOTE) == 1
    history.advance()  # three rounds later: out of the window
    assert len(history) == 0
    assert history.reversals(pfns(10), Direction.DEMOTE) == 0


def test_a_page_that_moves_again_is_recorded_under_its_new_frame_only() -> None:
    history = MoveHistory(window=8)
    history.record(pfns(5, 9), Direction.PROMOTE)
    history.forget(pfns(9))
    history.record(pfns(30), Direction.DEMOTE)
    assert len(history) == 2
    assert history.reversals(pfns(30), Direction.PROMOTE) == 1
    assert history.reversals(pfns(9), Direction.DEMOTE) == 0
