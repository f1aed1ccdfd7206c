"""Typed turns under the live view: keys read one at a time, the line being typed drawn by the view.

In the terminal's normal (cooked) mode the terminal echoes what is typed on the line the live view
redraws, so the text vanishes at the next redraw, and Enter's newline shifts the view down, leaving a
copy of its first line behind. So while the live view runs, the terminal is put in cbreak mode without
echo (Ctrl-C still interrupts) and `LineEditor` keeps the draft, which the view shows.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ENTER = ("\r", "\n")
BACKSPACE = ("\x7f", "\b")
CTRL_D = "\x04"
CTRL_U = "\x15"  # erase the whole draft, as in a shell
CTRL_W = "\x17"  # erase the last word
ESCAPE = "\x1b"
READ_BYTES = 64  # a paste arrives in pieces this large


@dataclass
class LineEditor:
    """Folds typed characters into a draft; `feed` returns each finished line (Enter)."""

    draft: str = ""
    eof: bool = False  # Ctrl-D on an empty draft
    _escape: str = ""  # an escape sequence (arrow keys...) being skipped

    def feed(self, text: str) -> list[str]:
        lines: list[str] = []
        for char in text:
            line = self._key(char)
            if line is not None:
                lines.append(line)
        return lines

    def _key(self, char: str) -> str | None:
        if self._escape:  # skip ESC x, or ESC [ parameters final-byte (arrow keys and the like)
            self._escape += char
            csi = self._escape[1] == "["
            if not csi or (len(self._escape) > 2 and "@" <= char <= "~"):
                self._escape = ""
            return None
        if char == ESCAPE:
            self._escape = char
        elif char in ENTER:
            line, self.draft = self.draft, ""
            return line
        elif char in BACKSPACE:
            self.draft = self.draft[:-1]
        elif char == CTRL_U:
            self.draft = ""
        elif char == CTRL_W:
            words = self.draft.rstrip()
            self.draft = words[: words.rfind(" ") + 1]
        elif char == CTRL_D and not self.draft:
            self.eof = True
        elif char.isprintable() or char == "\t":
            self.draft += char
        return None


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[bool]:
    """The terminal on `fd` in cbreak mode without echo for the block; yields False where that is
    impossible (not a POSIX terminal), and always restores the previous mode."""
    try:
        import termios
        import tty
    except ImportError:  # Windows
        yield False
        return
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield False
        return
    try:
        tty.setcbreak(fd)
        mode = termios.tcgetattr(fd)
        mode[3] &= ~termios.ECHO  # lflags
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_keys(fd: int, on_draft: Callable[[str], None], on_line: Callable[[str], None],
              stopped: Callable[[], bool]) -> bool:
    """Read keys from `fd` until end of input or Ctrl-D (True) or `stopped()` (False)."""
    editor = LineEditor()
    decoder = codecs.getincrementaldecoder(sys.stdin.encoding or "utf-8")(errors="replace")
    while not stopped():
        try:
            data = os.read(fd, READ_BYTES)
        except OSError:
            return True
        if not data:
            return True
        before = editor.draft
        for line in editor.feed(decoder.decode(data)):
            on_line(line)
        if editor.eof:
            return True
        if editor.draft != before:
            on_draft(editor.draft)
    return False
