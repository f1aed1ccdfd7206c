"""Settings from flag > environment > config file > default for every option; -v/-q; one-line usage errors."""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from glmvoice_cli.cli import _Group, app
from glmvoice_cli.commands import conventions

runner = CliRunner()
log = logging.getLogger("glmvoice_cli.test")


def _probe_app() -> typer.Typer:
    """A root like glmvoice's with two commands that print what they were given."""
    probe = typer.Typer(cls=_Group, add_completion=False)

    @probe.command("speak")
    def speak(
        top_p: Annotated[float, typer.Option("--top-p")] = 0.8,
        play: Annotated[bool, typer.Option("--play")] = False,
        out: Annotated[Path | None, typer.Option("--out")] = None,
    ) -> None:
        log.info("info line")
        typer.echo(f"top_p={top_p} play={play} out={out}")

    @probe.command("other")
    def other(top_p: Annotated[float, typer.Option("--top-p")] = 0.5) -> None:
        typer.echo(f"top_p={top_p}")

    return probe


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "cfg" / "config.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    monkeypatch.setenv("GLMVOICE_CONFIG", str(path))
    return path


@pytest.mark.parametrize(
    "flag, env, config, expected",
    [
        (None, None, None, "0.8"),
        (None, None, "top_p = 0.3", "0.3"),
        (None, "0.4", "top_p = 0.3", "0.4"),
        ("0.5", "0.4", "top_p = 0.3", "0.5"),
        (None, None, "top-p = 0.3\n[speak]\ntop_p = 0.6", "0.6"),  # a command's table beats the top
    ],
)
def test_precedence_flag_env_config_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None,
                                            env: str | None, config: str | None, expected: str) -> None:
    if config is not None:
        _config(tmp_path, monkeypatch, config)
    if env is not None:
        monkeypatch.setenv("GLMVOICE_TOP_P", env)
    args = ["speak"] + (["--top-p", flag] if flag else [])
    result = runner.invoke(_probe_app(), args)
    assert result.exit_code == 0, result.output
    assert f"top_p={expected} " in result.stdout


def test_top_level_key_reaches_every_command_with_that_option(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _config(tmp_path, monkeypatch, "top_p = 0.25\n")
    assert "top_p=0.25" in runner.invoke(_probe_app(), ["other"]).stdout


def test_flags_and_paths_from_env_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, monkeypatch, 'out = "answers/a.wav"\n')
    monkeypatch.setenv("GLMVOICE_PLAY", "1")
    result = runner.invoke(_probe_app(), ["speak"])
    assert result.exit_code == 0, result.output
    assert "play=True" in result.stdout
    assert f"out={path.parent / 'answers' / 'a.wav'}" in result.stdout  # relative to the file, as [paths]


def test_unknown_keys_are_reported_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, monkeypatch, 'tempreature = 0.1\nmodels = "m"\n[paths]\nlm = "x"\n'
                                          "[speak]\nvolume = 3\n[nosuch]\na = 1\n")
    result = runner.invoke(_probe_app(), ["speak"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {path}: unknown key 'tempreature' (ignored)",
                        f"warning: {path}: unknown key 'speak.volume' (ignored)",
                        f"warning: {path}: unknown key '[nosuch]' (ignored)"]


def test_bad_values_name_their_source_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMVOICE_TOP_P", "lots")
    result = runner.invoke(_probe_app(), ["speak"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "GLMVOICE_TOP_P" in result.stderr
    monkeypatch.delenv("GLMVOICE_TOP_P")
    path = _config(tmp_path, monkeypatch, 'top_p = "lots"\n')
    result = runner.invoke(_probe_app(), ["speak"])
    assert result.exit_code == 2 and f"the key 'top_p' of the config file {path}" in result.stderr


@pytest.mark.parametrize("args", [["tts", "--bogus"], ["nosuch"], ["chat", "--vad-aggressiveness", "9"],
                                  ["transcribe"], ["tts", "--temperature", "-1"]])
def test_usage_errors_are_one_line(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--help" in lines[0]


def test_verbose_and_quiet_set_the_log_level() -> None:
    assert "info: info line" not in runner.invoke(_probe_app(), ["speak"]).stderr
    assert "info: info line" in runner.invoke(_probe_app(), ["speak", "-v"]).stderr
    assert "info: info line" in runner.invoke(_probe_app(), ["-v", "speak"]).stderr
    runner.invoke(_probe_app(), ["-q", "speak"])
    assert conventions.is_quiet()
    runner.invoke(_probe_app(), ["speak"])
    assert not conventions.is_quiet()  # each run starts afresh


def test_every_option_of_every_command_has_its_environment_variable() -> None:
    root = typer.main.get_command(app)
    commands = conventions._leaf_commands(root)  # type: ignore[arg-type]
    assert {"chat", "tts", "transcribe", "models download", "doctor"} <= set(commands)
    for path, command in commands.items():
        for param in command.params:
            if param.param_type_name != "option" or param.name in ("help",):
                continue
            if param.name in conventions.MODEL_PATH_OPTIONS:
                assert param.envvar is None, (path, param.name)  # models.settings.locate owns their order
            else:
                assert param.envvar == f"GLMVOICE_{conventions.setting_name(param).upper()}", (path, param.name)
    chat = commands["chat"]
    names = {conventions.setting_name(p) for p in chat.params}
    assert {"compile", "top_p", "output", "threads"} <= names  # flags' names, not Python parameters'
    assert "compile_lm" not in names


@pytest.mark.parametrize("command", ["chat", "tts", "transcribe", "tokenize", "decode"])
def test_shared_option_names(command: str) -> None:
    """The same setting has the same name everywhere: --models, --device, --threads, --output."""
    names = {o for p in typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
             for o in getattr(p, "opts", [])}
    assert {"--models", "--device", "--threads", "-v", "-q"} <= names
    if command in ("chat", "tts", "transcribe"):
        assert {"--temperature", "--top-p", "--dtype"} <= names
    if command in ("chat", "tts", "decode"):
        assert "--output" in names


def test_flags_show_no_value_type_in_help() -> None:
    result = runner.invoke(app, ["tts", "--help"], env={"COLUMNS": "200"})
    play = next(line for line in result.stdout.splitlines() if "--play" in line)
    assert "<bool>" not in play


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout


def test_chat_turn_taking_flags_come_from_env_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The turn-taking flags follow the common mechanism: GLMVOICE_<FLAG> and config keys named after the flag."""
    from glmvoice_cli.commands import chat as chat_command
    from glmvoice_cli.errors import UsageError

    seen: list[object] = []
    turn_taking = chat_command.TurnTaking

    class Captured(UsageError):
        pass

    def capture(*args: object) -> object:
        seen.append(turn_taking(*args))  # type: ignore[arg-type]
        raise Captured("captured")

    class _Closed:
        output_unwritten = False

        def close(self) -> None:
            pass

    monkeypatch.setattr(chat_command, "open_local_audio", lambda *a: _Closed())
    monkeypatch.setattr(chat_command, "load_assistant", lambda *a, **k: type("A", (), {"dirs": {}})())
    (tmp_path / "session").mkdir()
    monkeypatch.setattr(chat_command, "open_store",
                        lambda *a: type("S", (), {"path": tmp_path / "session", "warnings": ()})())
    monkeypatch.setattr(chat_command, "TurnTaking", capture)
    _config(tmp_path, monkeypatch, "speculative_pause_ms = 120\npre-roll-ms = 90\nturn_detector = 'smart'\n"
                                   "max_pause_ms = 700\n"
                                   "[chat]\nbarge_in = false\nmax_turn_s = 12.5\nmin_interruption_ms = 40\n"
                                   "end_of_turn_threshold = 0.7\n")
    env = {"END_SILENCE_MS": "450", "VAD_AGGRESSIVENESS": "1", "MIN_SPEECH_MS": "250", "STREAM_INPUT": "0",
           "PRE_ROLL_MS": "60", "VAD": "silero", "VAD_THRESHOLD": "0.6"}  # the environment beats the file (pre_roll_ms)
    for name, value in env.items():
        monkeypatch.setenv(f"GLMVOICE_{name}", value)
    result = runner.invoke(app, ["chat", "--text", "--max-pause-ms", "900"])  # the flag beats the file
    assert "captured" in result.output and len(seen) == 1, result.output
    assert seen[0] == turn_taking(
        aggressiveness=1, end_silence_ms=450, speculative_pause_ms=120, pre_roll_ms=60, min_speech_ms=250,
        max_turn_s=12.5, barge_in=False, min_interruption_ms=40, stream_input=False, vad_engine="silero",
        turn_detector="smart", end_of_turn_threshold=0.7, max_pause_ms=900, vad_threshold=0.6)
    hints = typing.get_type_hints(chat_command.chat, include_extras=True)
    own = [name for name, hint in hints.items() if getattr(getattr(hint, "__metadata__", [None])[0], "envvar", None)]
    assert own == []  # no option names its own variable: install_envvars gives every one the same way


def test_a_misspelt_key_gets_the_nearest_known_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.cli import app

    path = _config(tmp_path, monkeypatch, "temprature = 0.3\n[chatt]\nx = 1\n[chat]\nend_silence_mss = 500\n")
    result = runner.invoke(app, ["sessions", "list"])
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {path}: unknown key 'temprature' (ignored); did you mean 'temperature'?",
                        f"warning: {path}: unknown key '[chatt]' (ignored); did you mean '[chat]'?",
                        (f"warning: {path}: unknown key 'chat.end_silence_mss' (ignored); did you mean "
                        "'chat.end_silence_ms'?")]
