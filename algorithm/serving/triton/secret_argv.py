"""Start a program with some arguments kept out of the process list.

tritonserver takes its admin key only inside a command-line flag (``--http-restricted-api=
<apis>:<header>=<key>``), and every user of the machine can read a process's arguments
(``/proc/<pid>/cmdline``, ``ps``). Triton 2.51 has no options file and no environment variable
for it. So the secret flags travel in the child's environment (``/proc/<pid>/environ`` is
readable only by its owner and root), and the command line carries placeholders:

1. the child asks to be traced (``PTRACE_TRACEME``) and execs; the kernel stops it right after
   ``execve``, before any of the program's code (the dynamic loader included) runs;
2. the parent reads the new process's initial stack through ``/proc/<pid>/mem`` (argc, the argv
   pointers, the envp pointers: the same layout on every Linux architecture), points each
   placeholder's ``argv[i]`` at the value of its environment entry, and points that entry at a
   harmless one, so the program's own ``environ`` (and every process it starts, the python
   backend stubs included) no longer holds the secret;
3. it detaches; the program parses the real flags, while ``/proc/<pid>/cmdline`` (the argument
   strings themselves, which were never changed) still shows the placeholders;
4. once the program has read its options (tritonserver: once it is ready), ``scrub_secret_args``
   overwrites the secret bytes, so not even ``/proc/<pid>/environ`` holds them any more.

Any surprise (ptrace refused by seccomp or Yama, a stack that does not look as expected) kills
the child and raises ServerError: nothing starts with the secret exposed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import struct
import subprocess
from collections.abc import Callable, Sequence

from algorithm.errors import ServerError

logger = logging.getLogger(__name__)

_PTRACE_TRACEME, _PTRACE_DETACH = 0, 17  # the same numbers on x86_64 and aarch64
_ENV_PREFIX = "UGT_SECRET_ARG_"
_ENV_DONE = "UGT_SECRET_ARGS_MOVED"  # what the secret environment entries are replaced by
_PTR = struct.Struct("@P")  # the native pointer
_TRACE_EXIT = 97  # the child's exit code when PTRACE_TRACEME itself failed
PLACEHOLDER = "--ugt-secret-argument-{}"
HINT = (
    "The kernel refused ptrace between this process and its child (seccomp, or "
    "kernel.yama.ptrace_scope >= 2), so the admin key cannot be kept out of the process list. "
    "Serve on 127.0.0.1 without a key, or run the generated container (deploy/), where only "
    "the container's own processes are visible."
)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    return libc


def _trace_me(then: Callable[[], None] | None) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        if then is not None:
            then()
        if _libc().ptrace(_PTRACE_TRACEME, 0, None, None) != 0:
            os._exit(_TRACE_EXIT)

    return preexec


def popen_with_secret_args(
    cmd: Sequence[str],
    secret: dict[int, str],
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None = None,
    **popen_kwargs,
) -> subprocess.Popen:
    """``subprocess.Popen(cmd)`` where ``cmd[i]`` is replaced by ``secret[i]`` for the program
    but not in its visible command line (the placeholder there names the position).

    Call it from the thread that will wait for the child: the tracer is a thread (Linux)."""
    argv = list(cmd)
    child_env = dict(env)
    for i, value in secret.items():
        if not 0 < i < len(argv):
            raise ValueError(f"secret argument index {i} outside the command")
        argv[i] = PLACEHOLDER.format(i)
        child_env[f"{_ENV_PREFIX}{i}"] = value
    child_env[_ENV_DONE] = "1"
    proc = subprocess.Popen(argv, env=child_env, preexec_fn=_trace_me(preexec_fn), **popen_kwargs)  # noqa: PLW1509
    try:
        _, status = os.waitpid(proc.pid, 0)
        if not os.WIFSTOPPED(status) or os.WSTOPSIG(status) != signal.SIGTRAP:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            proc.returncode = code if code is not None else -1
            raise ServerError(
                f"could not start {argv[0]} traced (wait status {status:#x}, exit code {code})",
                hint=HINT if code == _TRACE_EXIT else None,
            )
        proc.secret_spans = _move_secrets(proc.pid, argv, secret)
        if _libc().ptrace(_PTRACE_DETACH, proc.pid, None, None) != 0:
            raise ServerError(
                f"could not let go of {argv[0]} after setting its arguments: "
                f"{os.strerror(ctypes.get_errno())}"
            )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
        proc.returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        raise
    return proc


def _start_stack(pid: int) -> int:
    """The stack pointer at entry (``startstack``, field 28 of /proc/<pid>/stat): argc is there."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[28 - 3])


def scrub_secret_args(proc: subprocess.Popen) -> bool:
    """Overwrite the secret arguments in the running program's memory, once it has read them.
    False (and a warning) where the kernel does not let this process write there."""
    spans = getattr(proc, "secret_spans", None)
    if not spans or proc.poll() is not None:
        return False
    try:
        with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:
            for addr, length in spans:
                mem.seek(addr)
                mem.write(b"x" * length)
    except OSError as e:
        logger.warning(
            "could not scrub the secret arguments of process %d (%s): they stay in its "
            "environment block, readable by its owner and root only",
            proc.pid,
            e,
        )
        return False
    proc.secret_spans = []
    return True


def _move_secrets(pid: int, argv: list[str], secret: dict[int, str]) -> list[tuple[int, int]]:
    spans = []
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:

            def read_ptrs(addr: int, n: int) -> list[int]:
                mem.seek(addr)
                data = mem.read(n * _PTR.size)
                return [_PTR.unpack_from(data, k * _PTR.size)[0] for k in range(n)]

            def read_str(addr: int, limit: int) -> bytes:
                mem.seek(addr)
                data = mem.read(limit + 1)
                return data.split(b"\0", 1)[0]

            base = _start_stack(pid)
            (argc,) = read_ptrs(base, 1)
            if argc != len(argv):
                raise ServerError(f"unexpected initial stack: argc {argc}, expected {len(argv)}")
            argv_at = base + _PTR.size
            envp_at = argv_at + (argc + 1) * _PTR.size
            envp = []
            while len(envp) < 100_000:
                (p,) = read_ptrs(envp_at + len(envp) * _PTR.size, 1)
                if p == 0:
                    break
                envp.append(p)
            entries = {read_str(p, 128).split(b"=", 1)[0]: (k, p) for k, p in enumerate(envp)}
            if _ENV_DONE.encode() not in entries:
                raise ServerError("unexpected initial stack: the environment marker is missing")
            done_ptr = entries[_ENV_DONE.encode()][1]
            for i in secret:
                (arg_ptr,) = read_ptrs(argv_at + i * _PTR.size, 1)
                if read_str(arg_ptr, 256) != argv[i].encode():
                    raise ServerError(f"unexpected initial stack: argv[{i}] is not its placeholder")
                name = f"{_ENV_PREFIX}{i}".encode()
                k, env_ptr = entries[name]
                value_at = env_ptr + len(name) + 1  # after "NAME="
                mem.seek(argv_at + i * _PTR.size)
                mem.write(_PTR.pack(value_at))
                spans.append((value_at, len(secret[i].encode())))
                mem.seek(envp_at + k * _PTR.size)
                mem.write(_PTR.pack(done_ptr))
    except OSError as e:
        raise ServerError(
            f"could not set the hidden arguments of process {pid}: {e}", hint=HINT
        ) from e
    logger.debug(
        "moved %d secret argument(s) of process %d out of its command line", len(secret), pid
    )
    return spans


__all__ = ["PLACEHOLDER", "popen_with_secret_args", "scrub_secret_args"]
