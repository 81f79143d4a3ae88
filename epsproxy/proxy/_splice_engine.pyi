# The splice engine's C part (epsproxy/proxy/_splice_engine.c); see splice_engine.py.
FINISHED: int
CUT_LEFT: int
CUT_RIGHT: int
IDLE: int
ABORTED: int
BUFFER_BYTES: int

def notify_fd() -> int: ...
def add(
    left_fd: int,
    right_fd: int,
    to_left: bytes,
    to_right: bytes,
    left_eof: bool,
    right_eof: bool,
    read_bytes: int,
    idle_timeout: float,
) -> int: ...
def abort(handle: int) -> None: ...
def counts(handle: int) -> tuple[int, int, int, int, int, int, int]: ...
def collect() -> list[tuple[int, int, int, int, int, int]]: ...
def live() -> int: ...
