"""Chat Completions with audio: request semantics, the pipeline, OpenAI-shaped output."""
