"""epctl's exit codes, one scheme for every subcommand."""

# Its output's reader went away (`epctl status | head -1`): it stopped
# quietly, with the status a shell gives a tool that SIGPIPE ended (141).
from coordinator.pipes import EXIT_BROKEN_PIPE

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
]

EXIT_OK = 0
EXIT_FAILED = 1  # anything else (an operation rolled back under --wait, a write error)
EXIT_USAGE = 2  # bad usage or a request the coordinator calls invalid (INVALID_ARGUMENT)
EXIT_UNAVAILABLE = 3  # the coordinator could not be reached (UNAVAILABLE, DEADLINE_EXCEEDED)
EXIT_NOT_FOUND = 4  # no such operation or member (NOT_FOUND)
EXIT_REFUSED = 5  # the cluster's state does not allow it (FAILED_PRECONDITION)
# No or a wrong admin credential (UNAUTHENTICATED), or one that is not an
# admin's (PERMISSION_DENIED): see --token-file, --cert/--key.
EXIT_DENIED = 6
