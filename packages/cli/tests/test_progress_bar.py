"""The progress bar: redraws in place on a terminal, one plain line per log otherwise, with the numbers it is given."""

import io

from transformers import TrainerControl, TrainerState

from swiftune_cli.progress_bar import ProgressBar, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def drive(bar, clock, steps, start_step=0, max_steps=10, logs=None, tokens_per_step=0):
    """Run ``steps`` steps of 2 s each, logging after each one."""
    state, control = TrainerState(max_steps=max_steps, global_step=start_step), TrainerControl()
    state.num_input_tokens_seen = start_step * tokens_per_step
    bar.on_train_begin(None, state, control)
    for step in range(start_step + 1, start_step + steps + 1):
        clock.now += 2.0
        state.global_step = step
        state.num_input_tokens_seen += tokens_per_step
        bar.on_step_end(None, state, control)
        bar.on_log(None, state, control, logs=(logs or (lambda s: {"loss": 3.0 - 0.25 * s}))(step))
    bar.on_train_end(None, state, control)
    return state


def test_terminal_redraws_in_place_with_loss_lr_speed_and_time_left():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, is_tty=True, clock=clock)
    drive(bar, clock, 4, logs=lambda s: {"loss": 3.0 - 0.25 * s, "learning_rate": 1e-3, "tokens_per_second": 512.0})
    text = stream.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 8  # one redraw after each step and each log
    assert "\n" not in "".join(frames[:-1]) and text.endswith("\n")
    last = frames[-1]
    # 4 of 10 steps in 8 s: 2 s per step, 6 steps left.
    assert "[########------------]" in last  # 4/10 of 20 cells
    for part in ("step 4/10", "loss 2.0000", "lr 1.0e-03", "512 tok/s", "0:08 elapsed", "~0:12 left"):
        assert part in last, (part, last)
    assert bar.losses == [(1, 2.75), (2, 2.5), (3, 2.25), (4, 2.0)]


def test_pipe_gets_one_plain_line_per_log():
    stream, clock = io.StringIO(), FakeClock()
    drive(ProgressBar(stream, is_tty=False, clock=clock), clock, 3)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert [line.split("  ")[0] for line in lines] == ["step 1/10", "step 2/10", "step 3/10"]
    assert "loss 2.5000" in lines[1]


def test_tokens_per_second_from_trainer_state_when_not_logged():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, is_tty=False, clock=clock)
    drive(bar, clock, 4, tokens_per_step=300)
    # 1200 tokens in 8 s
    assert bar.tokens_per_second == 150.0 and "150 tok/s" in stream.getvalue().splitlines()[-1]


def test_resumed_run_counts_only_this_sessions_steps():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, is_tty=False, clock=clock)
    drive(bar, clock, 2, start_step=6, tokens_per_step=100)
    # 2 steps in 4 s this session, 2 steps left; 200 tokens of this session in 4 s.
    assert stream.getvalue().splitlines()[-1].endswith("0:04 elapsed  ~0:04 left")
    assert bar.tokens_per_second == 50.0


def test_non_finite_loss_is_not_kept():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, is_tty=False, clock=clock)
    drive(bar, clock, 2, logs=lambda s: {"loss": float("nan") if s == 2 else 1.0})
    assert bar.losses == [(1, 1.0)]


def test_format_duration():
    assert [format_duration(s) for s in (0, 7.4, 65, 3723, -3)] == ["0:00", "0:07", "1:05", "1:02:03", "0:00"]
