"""`glmvoice serve`: the OpenAI Realtime API over WebSocket, one conversation core per connection.

    protocol.py    the wire format: ids, errors, PCM16 audio, session settings (pure functions)
    wire_audio.py  24 kHz wire audio <-> the models' rates; the client's playback as an AudioSink
    session.py     one connection: client events -> ConversationCore; core events -> server events
    app.py         the Starlette app: authentication, session limit, the asyncio <-> thread bridge
"""
