"""The terminal's face of a chat: the Rich live view, the plain view and key handling (they only consume events)."""
