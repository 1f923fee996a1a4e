"""Typed errors. Library code raises these; only the CLI turns them into exit codes.

Each error's str() is one line that names the thing and the reason, fit to print as is.
`code` is the stable name carried on the wire when the daemon reports an error.
"""

TOO_MANY_SESSIONS = "too_many_sessions"  # the wire code of a HELLO refused a session
FILE_CHANGED = "file_changed"  # the wire code of a request for a file changed since its HELLO


class HobbitError(Exception):
    code = "error"


class ModelError(HobbitError):
    """A model file is missing, not a GGUF, truncated, or of an unsupported kind."""

    code = "bad_model"


class FileChanged(ModelError):
    """A model file changed (rewritten, truncated or replaced) after this process mapped it:
    what was computed on it is not used; opening the file again may succeed."""

    code = FILE_CHANGED


class InputError(HobbitError):
    """A request is out of range: a prompt longer than the context, a bad flag value."""

    code = "bad_input"


class ProtocolError(HobbitError):
    """A message that breaks the wire format; `code` is sent back in an ERROR."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class DaemonError(HobbitError):
    """The daemon answered a request with an ERROR, or could not be reached."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class RequestError(HobbitError):
    """A request the daemon answers with ERROR `code` (a wire code, see messages.py):
    raised by the cache (cache_full, io, checksum, shutting_down, pin_limit, bad_request,
    unknown_model) and by the server's own checks."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class NoFreeSession(DaemonError):
    """hobbitd answered HELLO too_many_sessions: every session it allows is taken, or all
    this process's or this user's share; the message says which and who holds them."""

    def __init__(self, socket: str, message: str):
        super().__init__(TOO_MANY_SESSIONS, f"hobbitd at {socket} has {message}")
