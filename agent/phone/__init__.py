"""Phone calls through Twilio Media Streams: the voice webhook that answers a call with
TwiML, and the media stream bridge that makes each call a realtime session (µ-law 8 kHz
both ways, barge-in with `clear` and marks, DTMF)."""
