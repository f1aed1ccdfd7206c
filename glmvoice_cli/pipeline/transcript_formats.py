"""A transcript as the whisper command lines write it: plain text, JSON with segments, SRT and WebVTT subtitles."""

from __future__ import annotations

import json
import re
from typing import Any

from glmvoice_cli.pipeline.transcribe import Transcript, TranscriptSegment

FORMATS = ("txt", "json", "srt", "vtt")
_BLANK_LINES = re.compile(r"\s*\n\s*")  # a blank line ends a subtitle cue: the model's line breaks become spaces


def _clock(seconds: float, decimal: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cue_text(segment: TranscriptSegment) -> str:
    # "-->" inside a cue would read as a new timing line in both formats.
    return _BLANK_LINES.sub(" ", segment.text).replace("-->", "->").strip()


def to_srt(transcript: Transcript) -> str:
    cues = [f"{i}\n{_clock(s.start_s, ',')} --> {_clock(s.end_s, ',')}\n{_cue_text(s)}\n"
            for i, s in enumerate(transcript.segments, 1)]
    return "\n".join(cues)


def to_vtt(transcript: Transcript) -> str:
    cues = [f"{_clock(s.start_s, '.')} --> {_clock(s.end_s, '.')}\n{_cue_text(s)}\n" for s in transcript.segments]
    return "\n".join(["WEBVTT\n", *cues])


def to_record(transcript: Transcript, file: str, load_s: float | None = None) -> dict[str, Any]:
    """The JSON object of one file: text, length, token counts, timings and the timed segments."""
    timings = {**({"load_s": round(load_s, 3)} if load_s is not None else {}), **transcript.timings}
    return {"file": file, "text": transcript.text, "seconds": round(transcript.seconds, 3),
            "tokens": transcript.speech_tokens, "generated_tokens": transcript.generated_tokens,
            "timings": timings,
            "segments": [{"start": s.start_s, "end": s.end_s, "text": s.text} for s in transcript.segments]}


def render(transcript: Transcript, fmt: str, file: str, load_s: float | None = None) -> str:
    """The whole text of one file's transcript in `fmt` (one of FORMATS), ending with a newline."""
    if fmt == "json":
        return json.dumps(to_record(transcript, file, load_s), ensure_ascii=False) + "\n"
    if fmt == "srt":
        return to_srt(transcript)
    if fmt == "vtt":
        return to_vtt(transcript)
    if fmt == "txt":
        return transcript.text + "\n"
    raise ValueError(f"unknown transcript format {fmt!r} (use {', '.join(FORMATS)})")
