"""Domain errors. The library raises these; only the CLI turns them into a one-line message."""

from __future__ import annotations


class GlmVoiceError(Exception):
    """Base class: its message is shown to the user as is, on one line."""

    exit_code = 1


class AudioError(GlmVoiceError):
    """An audio file is missing, unreadable, empty or holds invalid samples."""

    exit_code = 2


class CheckpointError(GlmVoiceError):
    """Model files are missing, malformed or do not match the expected keys and shapes."""

    exit_code = 3


class ModelNotFoundError(CheckpointError):
    """A model folder or one of its files does not exist."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes differ from what its config describes."""


class AudioDeviceError(GlmVoiceError):
    """No PortAudio, no microphone or no speaker."""

    exit_code = 4


class UsageError(GlmVoiceError):
    """Bad command-line input that Typer itself cannot catch (e.g. an unparsable token file)."""

    exit_code = 2


class ContextLengthError(GlmVoiceError):
    """A turn is too long for the model's context, even with every past turn dropped."""

    exit_code = 2


class HubUnreachableError(GlmVoiceError):
    """The model hub (or its proxy) cannot be reached: no network, a wrong HF_ENDPOINT, a firewall."""

    exit_code = 5


class LMServerError(GlmVoiceError):
    """A remote LM server (--lm-url) is unreachable, refuses a request, stalls or cuts an answer.

    A chat survives it: the turn is cut, the session kept, and the next turn tries again.
    """

    exit_code = 5
