"""`glmvoice decode` on tiny checkpoints: token files, stdin, formats, errors, and a round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import typer
from typer.testing import CliRunner

from glmvoice_cli.cli import _Group
from glmvoice_cli.cli import app as main_app
from glmvoice_cli.commands.decode import decode, parse_tokens
from glmvoice_cli.decoder.flow import mel_frames
from glmvoice_cli.errors import UsageError
from glmvoice_cli.tiny.decoder import TinyDecoderSpec, write_tiny_decoder
from glmvoice_cli.tiny.tokenizer import TinyTokenizerSpec, write_tiny_tokenizer

SAMPLE_RATE = 22_050
runner = CliRunner()


def _app() -> typer.Typer:
    """A stand-in for the main app until `decode` is registered there (same error handling)."""
    app = typer.Typer(cls=_Group, add_completion=False, pretty_exceptions_enable=False)
    app.command("decode")(decode)

    @app.callback()
    def _root() -> None:
        """glmvoice (test)"""

    return app


app = _app()


@pytest.fixture(scope="module")
def tiny_dec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("dec"), TinyDecoderSpec(vocab_size=64))


@pytest.mark.parametrize(("text", "ids"), [
    ("1 2 3\n4", [1, 2, 3, 4]), ("1,2, 3", [1, 2, 3]), ("[5, 6]", [5, 6]),
    ('{"file": "a.wav", "tokens": [7, 8]}\n{"file": "b.wav", "tokens": [9]}\n', [7, 8, 9]),
])
def test_parse_tokens(text: str, ids: list[int]) -> None:
    assert parse_tokens(text) == ids


@pytest.mark.parametrize("text", ["", "1 x 3", "[1, -2]", "[1.5]", '{"t": [1]}', "[true]", '{"tokens": "12"}'])
def test_parse_tokens_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_tokens(text)


@pytest.mark.parametrize(("text", "said"), [
    ("1 " + "9" * 100_000, "token id with 100000 digits is out of range"),
    ("[" + "9" * 100_000 + "]", "token id with 100000 digits is out of range"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ("[[1, 2], 3]", "got a nested JSON list"),
    ("1 " + "x" * 1_000_000, "... (1000000 characters)"),
])
def test_parse_tokens_refuses_absurd_input_in_a_short_line(text: str, said: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_tokens(text, "t.txt")
    message = str(caught.value)
    assert message.startswith("t.txt: ") and said in message and len(message) < 200


@pytest.mark.parametrize(("suffix", "stream"), [(".wav", False), (".flac", True), (".ogg", False)])
def test_decode_formats(tiny_dec: Path, tmp_path: Path, suffix: str, stream: bool) -> None:
    tokens = tmp_path / "t.txt"
    tokens.write_text(" ".join(str(i % 64) for i in range(30)))
    out = tmp_path / f"out{suffix}"
    args = ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(out), "--seed", "1"]
    result = runner.invoke(app, args + (["--stream"] if stream else []))
    assert result.exit_code == 0, result.output
    data, rate = sf.read(out)
    assert rate == SAMPLE_RATE
    assert len(data) == mel_frames(30, 12.5) * 256


def test_decode_stdin_json_reference_schedule(tiny_dec: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.wav"
    payload = json.dumps(list(range(40)))
    result = runner.invoke(app, ["decode", "-", "--decoder", str(tiny_dec), "-o", str(out), "--stream",
                                 "--schedule", "reference"], input=payload)
    assert result.exit_code == 0, result.output
    assert sf.info(out).frames > 0


@pytest.mark.parametrize(("content", "extra", "message", "code"), [
    ("1 2 x", [], "integers", 2),
    ("1 2 999", [], "out of range", 2),
    (None, [], "token file not found", 2),
    ("1 2 3", ["--schedule", "fast"], "unknown schedule", 2),
    ("1 2 3", ["-o", "out.mp4"], "cannot write", 2),
])
def test_decode_errors_are_one_line(tiny_dec: Path, tmp_path: Path, content: str | None, extra: list[str],
                                    message: str, code: int) -> None:
    tokens = tmp_path / "t.txt"
    if content is not None:
        tokens.write_text(content)
    args = ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(tmp_path / "o.wav"), *extra]
    if "-o" in extra:
        args = ["decode", str(tokens), "--decoder", str(tiny_dec), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_decode_bad_checkpoint_is_one_line(tiny_dec: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3")
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tmp_path / "none"), "-o",
                                 str(tmp_path / "o.wav")])
    assert result.exit_code == 3 and "decoder folder not found" in result.output


def test_decode_module_imports_no_torch() -> None:
    code = "import sys; import glmvoice_cli.commands.decode\nassert 'torch' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_tokenize_then_decode_round_trip(tiny_dec: Path, tmp_path: Path) -> None:
    tok_dir = write_tiny_tokenizer(tmp_path / "tok", TinyTokenizerSpec(codebook=64))
    wav = tmp_path / "in.wav"
    seconds = 2.0
    t = np.arange(int(seconds * 16_000)) / 16_000
    sf.write(wav, 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2, 16_000)
    tokenized = runner.invoke(main_app, ["tokenize", str(wav), "--tokenizer", str(tok_dir), "--json"])
    assert tokenized.exit_code == 0, tokenized.output
    tokens_file = tmp_path / "tokens.jsonl"
    tokens_file.write_text(tokenized.stdout)
    n_tokens = len(json.loads(tokenized.stdout)["tokens"])
    assert n_tokens == 25  # 12.5 tokens per second
    out = tmp_path / "out.wav"
    result = runner.invoke(app, ["decode", str(tokens_file), "--decoder", str(tiny_dec), "-o", str(out), "--stream"])
    assert result.exit_code == 0, result.output
    data, rate = sf.read(out)
    assert rate == SAMPLE_RATE and data.ndim == 1
    assert len(data) == mel_frames(n_tokens, 12.5) * 256
    assert abs(len(data) / rate - seconds) < 0.1


def test_long_input_is_decoded_in_bounded_blocks(tiny_dec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    """Offline, a long token file goes through the flow in blocks: no call sees more than one block and the
    default schedule's bounded prompt, so memory is set by the block size, not by the file's length."""
    from glmvoice_cli.decoder import speech_decoder
    from glmvoice_cli.decoder.flow import FlowModel

    block, n_tokens = 20, 130
    monkeypatch.setattr(speech_decoder, "OFFLINE_BLOCK_TOKENS", block)
    seen: list[int] = []
    inference = FlowModel.inference_rows

    def counting(self, tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(tokens.shape[1])  # prompt and new tokens
        return inference(self, tokens, *args, **kwargs)

    monkeypatch.setattr(FlowModel, "inference_rows", counting)
    tokens = tmp_path / "t.txt"
    tokens.write_text(" ".join(str(i % 64) for i in range(n_tokens)))
    out = tmp_path / "long.wav"
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(seen) == -(-n_tokens // block) and max(seen) <= block + speech_decoder.DEFAULT_SCHEDULE.context_tokens
    data, _ = sf.read(out)
    assert len(data) == mel_frames(n_tokens, 12.5) * 256  # the same length as one call would give
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_reference_schedule_refuses_an_unbounded_answer(tiny_dec: Path, tmp_path: Path) -> None:
    from glmvoice_cli.decoder.speech_decoder import REFERENCE_MAX_TOKENS

    tokens = tmp_path / "t.txt"
    tokens.write_text("1 " * (REFERENCE_MAX_TOKENS + 1))
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(tmp_path / "o.wav"),
                                 "--stream", "--schedule", "reference"])
    assert result.exit_code == 2 and "reference schedule" in result.output and "default schedule" in result.output


def test_a_failed_decode_leaves_an_existing_file_untouched(tiny_dec: Path, tmp_path: Path) -> None:
    out = tmp_path / "keep.wav"
    out.write_bytes(b"the user's recording")
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3 9999")
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(out)])
    assert result.exit_code == 2 and "9999" in result.output
    assert out.read_bytes() == b"the user's recording" and sorted(p.name for p in tmp_path.iterdir()) == [
        "keep.wav", "t.txt"]


def test_decode_bf16_on_cpu_is_close_to_fp32(tiny_dec: Path, tmp_path: Path) -> None:
    import torch

    from glmvoice_cli.decoder.checkpoint import load_decoder

    tokens = tmp_path / "t.txt"
    tokens.write_text(" ".join(str(i % 64) for i in range(30)))
    audio = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.wav"
        result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(out),
                                     "--seed", "1", "--device", "cpu", "--dtype", dtype])
        assert result.exit_code == 0, result.output
        audio[dtype] = sf.read(out, dtype="float32")[0]
    assert audio["bf16"].shape == audio["fp32"].shape and np.isfinite(audio["bf16"]).all()
    error = np.sqrt(np.mean((audio["bf16"] - audio["fp32"]) ** 2) / np.mean(audio["fp32"] ** 2))
    assert 0 < error < 0.1  # the same speech, with 16-bit rounding (not bit-identical: bf16 did run)
    models = load_decoder(tiny_dec, "cpu", torch.bfloat16)
    assert {p.dtype for p in models.flow.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models.hift.parameters()} == {torch.float32}  # the vocoder stays in fp32


def test_decode_unknown_dtype_is_one_line_before_any_model(tmp_path: Path) -> None:
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3")
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tmp_path / "none"), "-o",
                                 str(tmp_path / "o.wav"), "--dtype", "int8"])
    assert result.exit_code == 2 and "unknown dtype 'int8'" in result.output
    assert "decoder folder" not in result.output


def test_a_dtype_the_device_cannot_run_is_one_line(tiny_dec: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    real = torch.nn.functional.conv1d

    def no_half(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if x.dtype == torch.float16:
            raise RuntimeError('"slow_conv1d" not implemented for \'Half\'')
        return real(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "conv1d", no_half)
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3 4 5 6 7 8 9 10 11 12")
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(tmp_path / "o.wav"),
                                 "--device", "cpu", "--dtype", "fp16"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cpu cannot run float16" in lines[0] and "--dtype fp32" in lines[0]
    assert not (tmp_path / "o.wav").exists()


class _Speaker:
    """A speaker that keeps what it was given and plays it at once."""

    sample_rate = SAMPLE_RATE
    pending = 0

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.closed = False

    def write(self, block: np.ndarray) -> None:
        self.blocks.append(np.asarray(block, np.float32))

    def close(self) -> None:
        self.closed = True


def test_decode_plays_without_output_and_with_play_plays_what_it_writes(
        tiny_dec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.commands import decode as decode_cmd

    speakers: list[_Speaker] = []
    monkeypatch.setattr(decode_cmd, "open_speaker", lambda device: speakers.append(_Speaker()) or speakers[-1])
    tokens = tmp_path / "t.txt"
    tokens.write_text(" ".join(str(i % 64) for i in range(30)))
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "--stream"])
    assert result.exit_code == 0, result.output
    assert len(speakers) == 1 and len(speakers[0].blocks) > 1 and speakers[0].closed  # block by block
    assert list(tmp_path.iterdir()) == [tokens]  # playing writes no file

    out = tmp_path / "out.wav"
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(out), "--play"])
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out, dtype="float32")
    played = np.concatenate(speakers[1].blocks)
    assert len(speakers) == 2 and len(played) == len(audio) and rate == SAMPLE_RATE
    np.testing.assert_allclose(np.clip(played, -1, 1), audio, atol=1e-4)  # the file holds 16-bit samples

    runner.invoke(app, ["decode", str(tokens), "--decoder", str(tiny_dec), "-o", str(tmp_path / "x.wav")])
    assert len(speakers) == 2  # a file alone opens no speaker


def test_decode_with_no_speaker_is_one_line_before_any_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.audio import devices

    def no_portaudio() -> None:
        raise devices.AudioDeviceError("PortAudio library not found (install it: apt install libportaudio2)")

    monkeypatch.setattr(devices, "import_sounddevice", no_portaudio)
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3")
    result = runner.invoke(app, ["decode", str(tokens), "--decoder", str(tmp_path / "absent")])
    assert result.exit_code == 4 and "PortAudio" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
