"""The run screen's curves: what a person sees for falling, flat, short and long series."""

from tui.widgets.live import curve_rows


def test_a_falling_loss_is_drawn_high_on_the_left_and_low_on_the_right():
    rows = curve_rows([3.0, 2.0, 1.5, 1.2, 1.0, 0.9], width=6, height=3)
    assert len(rows) == 3 and all(len(r) == 6 for r in rows)
    assert rows[0][0] == "█" and rows[0][-1] == " "   # the top row: only the start reaches it
    assert rows[-1] == "███▄▂▁"  # the bottom row: the lowest value still a sliver
    heights = [sum(" ▁▂▃▄▅▆▇█".index(r[c]) for r in rows) for c in range(6)]
    assert heights == sorted(heights, reverse=True)


def test_more_values_than_columns_are_averaged_into_them():
    rows = curve_rows([0.0] * 50 + [1.0] * 50, width=2, height=1)
    assert rows == ["▁█"]


def test_a_flat_curve_sits_at_half_height_and_no_values_leave_a_baseline():
    assert curve_rows([2.0, 2.0, 2.0], width=3, height=2) == ["   ", "███"]
    assert curve_rows([], width=4, height=2) == ["    ", "▁▁▁▁"]
    assert curve_rows([1.0], width=3, height=1) == ["▄▄▄"]
    assert curve_rows([1.0, 2.0], width=0, height=3) == []
