"""Option values that parse but make no sense end in one line naming the option, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmvoice_cli.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["tts", "hi", "--seed", str(2**64)], "--seed"),
        (["tts", "hi", "--seed", "-1"], "--seed"),
        (["tts", "hi", "--seed", "1" * 100_000], "--seed"),
        (["transcribe", "x.wav", "--window", "inf"], "--window"),
        (["chat", "--input-file", "x.wav", "--simulate-echo", "inf"], "--simulate-echo"),
        (["chat", "--text", "--max-turn-s", "inf"], "--max-turn-s"),
        (["chat", "--text", "--end-silence-ms", str(10**12)], "--end-silence-ms"),
        (["tts", "hi", "--threads", "99999999"], "--threads"),
        (["tts", "hi", "--temperature", "inf"], "--temperature"),
        (["tts", "hi", "--temperature", "1e308"], "--temperature"),
        (["tts", "hi", "--top-p", "0"], "--top-p"),
        (["tts", "hi", "--lm-timeout", "inf"], "--lm-timeout"),
        (["tts", "hi", "--max-new-tokens", str(10**12)], "--max-new-tokens"),
        (["tokenize", "x.wav", "--batch-size", "0"], "--batch-size"),
        (["tts", "hi", "--schedule", "demo"], "--schedule"),
        (["chat", "--text", "--schedule", "demo"], "--schedule"),
        (["serve", "--schedule", "demo"], "--schedule"),
    ],
)
def test_a_bad_option_value_is_one_line(args: list[str], named: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [*args, "--models", str(tmp_path / "none")])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))


def test_a_capture_thread_that_dies_ends_the_chat_with_one_line(assistant: object) -> None:
    """Any failure on the capture thread (here an OverflowError from the frame classifier, as `--max-turn-s inf`
    once gave) ends the chat with one line instead of leaving it waiting forever."""
    import numpy as np

    from glmvoice_cli.audio.fakes import ArraySource, NullSink
    from glmvoice_cli.audio.playback import VirtualClock
    from glmvoice_cli.chat.engine import ChatEngine, EngineConfig

    def overflowing(frame: np.ndarray) -> bool:
        raise OverflowError("cannot convert float infinity to integer")

    clock = VirtualClock()
    engine = ChatEngine(assistant, ArraySource(np.zeros(16_000, np.float32), 16_000, clock=clock),  # type: ignore[arg-type]
                        NullSink(), config=EngineConfig(lockstep=True), classifier=overflowing, clock=clock)
    engine.start()
    assert engine.wait(60), "the chat never ended"
    engine.join()
    assert engine.error is not None and str(engine.error) == (
        "chat engine failed: OverflowError: cannot convert float infinity to integer")
