"""The base class of every error that means the user's input is wrong: a path, a flag,
a config value, a file's content. Entry points print such an error as one line
(`error: ...`, exit status 2) with no traceback; anything else is a bug and keeps its
traceback."""


class UserError(Exception):
  """The input is wrong; the message says which input and what to do instead."""
