"""The speaker as the one-shot commands (`tts`, `decode`) use it: opened before any model loads, so a missing
device fails in a second rather than after the work, and drained at the end so the last words are heard."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from glmvoice_cli.errors import AudioDeviceError

if TYPE_CHECKING:
    from glmvoice_cli.audio.devices import AudioSink

DRAIN_POLL_S = 0.05  # how often to check that the speaker has played everything
DRAIN_STALL_S = 5.0  # queued audio that does not move for this long: the output device is gone


def open_speaker(device: str | None) -> AudioSink:
    from glmvoice_cli.audio.devices import Speaker

    return Speaker(device)  # an index or a part of a name


def drain(speaker: AudioSink) -> None:
    """Wait until the speaker has played everything; queued audio that stops moving is a lost device."""
    from glmvoice_cli.audio.devices import DEVICES_HINT

    last, since = speaker.pending, time.monotonic()
    while (pending := speaker.pending) > 0:
        if pending != last:
            last, since = pending, time.monotonic()
        elif time.monotonic() - since > DRAIN_STALL_S:
            raise AudioDeviceError(f"the speaker stopped playing (unplugged?); {DEVICES_HINT}")
        time.sleep(DRAIN_POLL_S)
