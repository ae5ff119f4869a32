"""The HTTP server (OpenAI wire protocol, metrics) and the command line. The top wing: it may import
every other wing; nothing imports it."""
