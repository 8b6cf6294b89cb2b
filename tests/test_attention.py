"""The sliding window is applied as the installed transformers applies it (a query at p sees keys p - window < j <= p;
before 4.46 Phi-3's SDPA path ignored the window)."""
import pytest
from conftest import generator, hf_pipeline, reference

import optimize

from orinfer.tiny import write_tiny_model


@pytest.mark.parametrize("window", [24, 50])
def test_sliding_window_matches_pipeline(tmp_path, public_chats, window):
    folder = write_tiny_model(tmp_path, seed=1, std=0.1, sliding_window=window)
    chats = public_chats[:6]
    expected = reference(hf_pipeline(folder), chats, max_new_tokens=30, return_full_text=False)
    assert generator(folder)(chats, max_new_tokens=30, return_full_text=False) == expected
    unwindowed = write_tiny_model(tmp_path / "full", seed=1, std=0.1)
    same_without_window = generator(unwindowed)(chats, max_new_tokens=30, return_full_text=False) == expected
    # Where the window applies it really changes the answer here, or this test would prove nothing.
    assert same_without_window != optimize.SLIDING_WINDOW_APPLIES
